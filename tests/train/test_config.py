"""train.config: defaults <- YAML <- CLI, type checks, value checks naming the option, data checks, saving."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import implied_loss_config, make_examples, write_annotated_dir
from train.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    deepspeed_dict,
    eval_grouping,
    format_config,
    help_text,
    load_config,
    loss_options,
    save_config,
    to_dict,
    validate,
    validate_against_data,
    validate_eval_data,
)
from train.losses import build_loss

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write_yaml(path: Path, data: dict | str) -> str:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return str(path)


def valid(**overrides) -> TrainConfig:
    """A config that passes validate(): defaults plus data.train, then dotted overrides."""
    return load_config(["data.train=shards/x", *(f"{k}={v}" for k, v in overrides.items())])


# --- loading ----------------------------------------------------------------------------------


def test_defaults_are_the_dataclass_defaults():
    config = load_config([])
    assert config == TrainConfig()
    assert config.loss.lambda_ == 0.9 and config.importance.rho == 0.7 and config.optim.betas == (0.9, 0.95)
    assert config.report_to == ["jsonl", "tensorboard"]


def test_yaml_then_cli_precedence(tmp_path):
    first = write_yaml(tmp_path / "a.yaml", {"optim": {"lr": "2e-5", "eps": 1e-6}, "seed": 3, "data": {"train": "d1"}})
    second = write_yaml(tmp_path / "b.yaml", {"optim": {"lr": 3.0e-5}, "data": {"validation": "v"}})
    config = load_config(["--config", first, f"--config={second}", "optim.lr=4e-5", "--seed=5", "--train.epochs", "3"])
    assert config.optim.lr == 4e-5  # CLI beats both files
    assert config.optim.eps == 1e-6  # first file, untouched later
    assert config.seed == 5 and config.train.epochs == 3
    assert config.data.train == "d1" and config.data.validation == "v"  # both files merge per key
    assert config.optim.weight_decay == 0.1  # default
    # Later overrides of the same key win, in order.
    assert load_config(["seed=1", "seed=2"]).seed == 2


def test_value_types_are_coerced(tmp_path):
    config = load_config([
        "optim.lr=1e-4",  # YAML 1.1 reads 1e-4 as a string
        "data.micro_batch_tokens=8e3",
        "data.shuffle=false",
        "optim.betas=[0.8, 0.99]",
        "report_to=jsonl",
        "loss.rho1_rho=0.5",
        "data.train=0123",  # string options take the text as written
        "model=1.50",
    ])
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.data.micro_batch_tokens == 8000 and isinstance(config.data.micro_batch_tokens, int)
    assert config.data.shuffle is False
    assert config.optim.betas == (0.8, 0.99)
    assert config.report_to == ["jsonl"]
    assert config.loss.rho1_rho == 0.5
    assert config.data.train == "0123" and config.model == "1.50"
    assert load_config(["loss.rho1_rho=0.5", "loss.rho1_rho=null"]).loss.rho1_rho is None
    assert load_config(["report_to=[]"]).report_to == []
    assert load_config(["optim.betas=0.5,0.6"]).optim.betas == (0.5, 0.6)
    assert load_config(["optim={lr: 3.0e-4, eps: 1.0e-6}"]).optim.lr == 3e-4  # a whole section


@pytest.mark.parametrize(
    "arg, needle",
    [
        ("data.micro_batch_tokens=abc", "data.micro_batch_tokens: expected an integer"),
        ("data.micro_batch_tokens=1.5", "data.micro_batch_tokens: expected an integer"),
        ("data.shuffle=maybe", "data.shuffle: expected true or false"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("train.epochs=true", "train.epochs: expected an integer"),
        ("optim.lr.peak=1", "optim.lr is an option, not a section"),
        ("optim=3", "optim: expected a mapping"),
        ("novalue", "'novalue' is not KEY=VALUE"),
    ],
)
def test_bad_cli_values_name_the_option(arg, needle):
    with pytest.raises(ConfigError, match="command line") as info:
        load_config([arg])
    assert needle in str(info.value)


def test_bad_yaml_value_names_the_file_and_option(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"optim": {"lr": [1]}, "model": 3.5})
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    message = str(info.value)
    assert f"{path}: optim.lr: expected a number" in message
    assert f"{path}: model: expected a string" in message  # every problem, not only the first


@pytest.mark.parametrize(
    "key, suggestion",
    [
        ("loss.lamda", "loss.lambda"),
        ("loss.lambda_", "loss.lambda"),
        ("optim.learning_rate", None),
        ("rho", "importance.rho"),
        ("lr", "optim.lr"),
        ("importance.scorrer", "importance.scorer"),
    ],
)
def test_unknown_key_in_yaml_names_file_and_suggests(tmp_path, key, suggestion):
    section, _, leaf = key.rpartition(".")
    data = {section: {leaf: 1}} if section else {leaf: 1}
    path = write_yaml(tmp_path / "u.yaml", data)
    with pytest.raises(ConfigError) as info:
        load_config(["--config", path])
    message = str(info.value)
    assert f"{path}: unknown key {key!r}" in message
    if suggestion:
        assert f"did you mean {suggestion}" in message


def test_unknown_section_in_yaml_suggests(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {"trian": {"epochs": 2}})
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean train\?\)"):
        load_config(["--config", path])


def test_unknown_key_on_cli_suggests():
    with pytest.raises(ConfigError, match=r"command line: unknown key 'optim.weight_decy' \(did you mean optim.weight_decay\?\)"):
        load_config(["optim.weight_decy=0.1"])
    with pytest.raises(ConfigError, match=r"unknown key 'trian.epochs' \(did you mean train.epochs\?\)"):
        load_config(["trian.epochs=2"])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(["--config", write_yaml(tmp_path / "list.yaml", "- a\n- b\n")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(["--config", write_yaml(tmp_path / "bad.yaml", "a: [\n")])
    assert load_config(["--config", write_yaml(tmp_path / "empty.yaml", "")]) == TrainConfig()


def test_lambda_key_maps_both_ways(tmp_path):
    config = load_config(["--config", write_yaml(tmp_path / "l.yaml", {"loss": {"lambda": 0.25}})])
    assert config.loss.lambda_ == 0.25
    assert load_config(["loss.lambda=0.3"]).loss.lambda_ == 0.3
    saved = to_dict(config)
    assert saved["loss"]["lambda"] == 0.25 and "lambda_" not in saved["loss"]
    assert "loss.lambda " in help_text() and not re.search(r"lambda_(?!\w)", help_text())
    assert "lambda: 0.25" in format_config(config)


def test_help_lists_every_key_with_default_and_description(capsys):
    with pytest.raises(SystemExit) as info:
        load_config(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in ["model", "data.train", "data.micro_batch_tokens", "importance.scope", "loss.lambda", "loss.rho1_rho",
                "optim.betas", "optim.min_lr_ratio", "train.ce_chunk", "checkpoint.resume", "eval.max_batches", "report_to"]:
        line = next(l for l in out.splitlines() if l.strip().startswith(key + " "))
        assert "=" in line and len(line.split("=", 1)[1].split()) >= 2, line  # a default and a description
    assert "4096" in out and "smollm2-135m-instruct" in out
    # The command the README gives (issue 30: --help said python -m train.main).
    assert out.startswith("usage: python train/main.py [--config FILE ...] [KEY=VALUE ...]")


# --- validate -----------------------------------------------------------------------------------


def test_defaults_with_train_data_validate():
    validate(valid())


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"loss.lambda": 1.5}, "loss.lambda:"),
        ({"loss.lambda": -0.1}, "loss.lambda:"),
        ({"loss.lambda_max": 1.1}, "loss.lambda_max:"),
        ({"loss.lambda_min": -1}, "loss.lambda_min:"),
        ({"loss.lambda_min": 0.5, "loss.lambda_max": 0.4}, "loss.lambda_min: 0.5 must be <= loss.lambda_max"),
        ({"loss.lambda_schedule": "cosine"}, "loss.lambda_schedule:"),
        ({"loss.name": "focal"}, "loss.name: 'focal' is not one of"),
        ({"loss.infosft_p": 1.0}, "loss.infosft_p:"),
        ({"loss.infosft_p": 0.3}, "loss.infosft_p:"),
        ({"loss.rho1_rho": 1.0}, "loss.rho1_rho:"),
        ({"loss.eaft_k": 1}, "loss.eaft_k: 1 must be an integer >= 2"),
        ({"loss.eaft_k": 0}, "loss.eaft_k:"),
        ({"loss.eaft_alpha": -0.5}, "loss.eaft_alpha: -0.5 must be a finite number >= 0"),
        ({"loss.eaft_alpha": ".inf"}, "loss.eaft_alpha:"),
        ({"importance.scorer": "none"}, "importance.scorer: none, but loss.name=sftgo trains by a stored score"),
        ({"importance.scorer": "none", "loss.name": "weighted"}, "importance.scorer: none, but loss.name=weighted"),
        ({"importance.scorer": "none", "loss.name": "rho1"}, "importance.scorer: none, but loss.name=rho1"),
        ({"importance.rho": 1.0}, "importance.rho:"),
        ({"importance.rho": -0.2}, "importance.rho:"),
        ({"importance.rho": ".nan"}, "importance.rho:"),
        ({"importance.scope": "global"}, "importance.scope:"),
        ({"importance.scorer": "score_tfidf"}, "importance.scorer:"),
        ({"importance.scorer": "''"}, "importance.scorer:"),
        ({"data.train": "''"}, "data.train: required"),
        ({"data.micro_batch_tokens": 0}, "data.micro_batch_tokens:"),
        ({"data.num_workers": -1}, "data.num_workers:"),
        ({"train.grad_accum": 0}, "train.grad_accum:"),
        ({"train.epochs": 0}, "train.epochs:"),
        ({"train.max_steps": -1}, "train.max_steps:"),
        ({"train.dtype": "float16"}, "train.dtype:"),
        ({"train.attn_implementation": "flash"}, "train.attn_implementation:"),
        ({"train.ce_chunk": 0}, "train.ce_chunk:"),
        ({"train.log_every": 0}, "train.log_every:"),
        ({"optim.lr": float("nan")}, "optim.lr:"),
        ({"optim.lr": -1e-5}, "optim.lr:"),
        ({"optim.weight_decay": -0.1}, "optim.weight_decay:"),
        ({"optim.betas": "[0.9,1.0]"}, "optim.betas:"),
        ({"optim.eps": 0}, "optim.eps:"),
        ({"optim.schedule": "step"}, "optim.schedule:"),
        ({"optim.warmup_ratio": 1.0}, "optim.warmup_ratio:"),
        ({"optim.warmup_steps": -1}, "optim.warmup_steps:"),
        ({"optim.warmup_steps": 5, "optim.warmup_ratio": 0.1}, "set one"),
        ({"optim.min_lr_ratio": 2}, "optim.min_lr_ratio:"),
        ({"optim.grad_clip": -1}, "optim.grad_clip:"),
        ({"checkpoint.every": -1}, "checkpoint.every:"),
        ({"checkpoint.keep": 0}, "checkpoint.keep:"),
        ({"checkpoint.resume": "/no/such/checkpoint"}, "checkpoint.resume: /no/such/checkpoint does not exist"),
        ({"eval.every": 5}, "eval.every: 5 needs data.validation"),
        ({"eval.max_batches": -1}, "eval.max_batches:"),
        ({"eval.rho": 1.0}, "eval.rho: 1.0 must be in [0, 1)"),
        ({"eval.scope": "document"}, "eval.scope: 'document' is not one of"),
        ({"report_to": "mlflow"}, "report_to:"),
        ({"seed": -1}, "seed:"),
        ({"model": "''"}, "model: required"),
        ({"deepspeed_config": "missing/ds.json"}, "deepspeed_config: missing/ds.json does not exist"),
    ],
)
def test_invalid_values_name_the_option(overrides, option):
    config = valid(**overrides)
    with pytest.raises(ConfigError) as info:
        validate(config)
    assert option in str(info.value)


def test_validate_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        validate(valid(**{"loss.lambda": 2, "optim.lr": -1.0, "importance.scope": "x"}))
    message = str(info.value)
    assert "loss.lambda:" in message and "optim.lr:" in message and "importance.scope:" in message


def test_deepspeed_config_with_optimizer_section_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match="deepspeed_config: .* has a 'optimizer' section"):
        validate(valid(deepspeed_config=str(path)))


def test_boundary_values_are_valid():
    validate(valid(**{"loss.lambda": 0, "loss.lambda_min": 0, "loss.lambda_max": 1, "importance.rho": 0,
                      "loss.rho1_rho": 0.0, "optim.grad_clip": 0, "optim.min_lr_ratio": 1, "report_to": "[]"}))


# --- shipped configs ----------------------------------------------------------------------------


def test_expected_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"demo_cpu.yaml", "lima_sftgo.yaml", "lima_sft.yaml", "lima_rho1.yaml", "lima_llmlingua2.yaml",
            "alpaca_sftgo.yaml", "alpaca_sft.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default deepspeed_config resolves against the repository too
    config = load_config(["--config", str(path)])
    if not config.data.train:  # a config that leaves the data to the user (cpu_starter.yaml)
        config = load_config(["--config", str(path), "data.train=shards/mine"])
    validate(config)  # data paths are not opened here
    build_loss(config.loss.name, **loss_options(config))  # the loss accepts the options


def test_shipped_paper_settings():
    for name in ("lima_sftgo", "lima_sft", "lima_rho1", "lima_llmlingua2", "alpaca_sftgo", "alpaca_sft"):
        assert load_config(["--config", str(CONFIGS / f"{name}.yaml")]).train.zero_stage == "3", name  # 3B-8B models
    assert load_config(["--config", str(CONFIGS / "demo_cpu.yaml")]).train.zero_stage == "auto"
    lima = load_config(["--config", str(CONFIGS / "lima_sftgo.yaml")])
    assert (lima.optim.lr, lima.optim.weight_decay, lima.optim.schedule, lima.train.epochs) == (1e-5, 0.1, "cosine", 15)
    assert (lima.importance.scorer, lima.importance.rho, lima.loss.lambda_) == ("tfidf", 0.9, 0.9)
    assert lima.optim.warmup_steps == 0 and lima.optim.warmup_ratio == 0
    ling = load_config(["--config", str(CONFIGS / "lima_llmlingua2.yaml")])
    assert (ling.importance.scorer, ling.importance.rho, ling.loss.lambda_schedule) == ("llmlingua2", 0.7, "linear")
    assert (ling.loss.lambda_max, ling.loss.lambda_min) == (0.9, 0.07)
    rho1 = load_config(["--config", str(CONFIGS / "lima_rho1.yaml")])
    assert rho1.loss.name == "rho1" and loss_options(rho1) == {"rho": 0.55}
    alpaca = load_config(["--config", str(CONFIGS / "alpaca_sftgo.yaml")])
    assert (alpaca.optim.weight_decay, alpaca.optim.warmup_ratio, alpaca.train.epochs) == (0.05, 0.07, 1)
    assert (alpaca.importance.scorer, alpaca.importance.rho) == ("tfidf", 0.7)
    demo = load_config(["--config", str(CONFIGS / "demo_cpu.yaml")])
    assert demo.model == "smollm2-135m-instruct" and demo.data.micro_batch_tokens == 1024
    assert demo.train.max_steps == 6 and not demo.train.gradient_checkpointing


def test_deepspeed_json_has_no_optimizer_and_fills_auto():
    raw = json.loads((CONFIGS / "deepspeed.json").read_text())
    assert "optimizer" not in raw and "scheduler" not in raw
    assert raw["zero_optimization"]["stage"] == "auto"  # train.zero_stage decides
    assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    config = valid(**{"train.grad_accum": 4, "optim.grad_clip": 0.5})
    filled = deepspeed_dict(config, world_size=2, dtype="bfloat16", zero_stage=3)
    assert filled["gradient_accumulation_steps"] == 4 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is True and filled["train_micro_batch_size_per_gpu"] == 1
    assert filled["zero_optimization"]["stage"] == 3
    assert "auto" not in json.dumps(filled)
    assert deepspeed_dict(config, world_size=1, dtype="float32", zero_stage=2)["bf16"]["enabled"] is False
    # Stage 0 in fp32: the trainer clips (and logs the norm), so DeepSpeed must not clip a second time.
    stage0 = deepspeed_dict(config, world_size=1, dtype="float32", zero_stage=0)
    assert stage0["zero_optimization"]["stage"] == 0 and stage0["gradient_clipping"] == 0.0
    assert deepspeed_dict(config, world_size=1, dtype="bfloat16", zero_stage=1)["gradient_clipping"] == 0.5


def test_bf16_weights_accumulate_gradients_in_fp32_and_offload_reaches_the_json(tmp_path):
    config = valid()
    for stage in (1, 2, 3):
        filled = deepspeed_dict(config, world_size=2, dtype="bfloat16", zero_stage=stage)
        assert filled["data_types"] == {"grad_accum_dtype": "fp32"} and filled["bf16"]["enabled"] is True
        assert "offload_optimizer" not in filled["zero_optimization"]
    # fp32 weights: DeepSpeed's default (the model dtype) is already fp32.
    assert "data_types" not in deepspeed_dict(config, world_size=1, dtype="float32", zero_stage=0)
    # DeepSpeed 0.19 raises "unsupported mix" for bf16 + fp32 accumulation without ZeRO: refused here first.
    with pytest.raises(ConfigError, match="stage >= 1"):
        deepspeed_dict(config, world_size=1, dtype="bfloat16", zero_stage=0)
    offloaded = deepspeed_dict(config, world_size=1, dtype="bfloat16", zero_stage=2, offload_optimizer=True)
    assert offloaded["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert offloaded["zero_force_ds_cpu_optimizer"] is False and offloaded["zero_optimization"]["stage"] == 2
    # A JSON asking for bf16 accumulation is refused, not silently overridden.
    path = tmp_path / "ds.json"
    raw = json.loads((CONFIGS / "deepspeed.json").read_text())
    raw["data_types"] = {"grad_accum_dtype": "bf16"}
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="grad_accum_dtype is 'bf16'"):
        deepspeed_dict(valid(**{"deepspeed_config": str(path)}), world_size=1, dtype="bfloat16", zero_stage=1)


def test_zero_stage_key_and_a_stage_written_in_the_json(tmp_path):
    for stage in ("auto", "0", "1", "2", "3"):
        validate(valid(**{"train.zero_stage": stage}))
    assert load_config(["data.train=x", "train.zero_stage=3"]).train.zero_stage == "3"
    path = tmp_path / "zero3.yaml"
    path.write_text("data:\n  train: x\ntrain:\n  zero_stage: 3\n")  # a YAML integer is accepted
    assert load_config(["--config", str(path)]).train.zero_stage == "3"
    with pytest.raises(ConfigError, match=r"train.zero_stage: '4' is not one of \['auto', '0', '1', '2', '3'\]"):
        validate(valid(**{"train.zero_stage": 4}))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    config = valid(deepspeed_config=str(ds))
    from train.config import json_zero_stage

    assert json_zero_stage(config) == 3
    assert deepspeed_dict(config, world_size=1, dtype="float32", zero_stage=3)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="zero_optimization.stage is 3 but train.zero_stage resolved to 0"):
        deepspeed_dict(config, world_size=1, dtype="float32", zero_stage=0)


def test_unknown_auto_in_deepspeed_json_is_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}))
    with pytest.raises(ConfigError, match="zero_optimization.reduce_bucket_size is \"auto\""):
        deepspeed_dict(valid(deepspeed_config=str(path)), world_size=1, dtype="float32", zero_stage=3)


# --- loss options ------------------------------------------------------------------------------


def test_loss_options_map_to_build_loss():
    assert loss_options(valid(**{"loss.name": "rho1", "importance.rho": 0.4})) == {"rho": 0.4}
    assert loss_options(valid(**{"loss.name": "rho1", "loss.rho1_rho": 0.6})) == {"rho": 0.6}
    assert loss_options(valid(**{"loss.name": "infosft", "loss.infosft_p": 0.9})) == {"p": 0.9}
    assert loss_options(valid(**{"loss.name": "dft"})) == {}
    assert loss_options(valid(**{"loss.name": "eaft", "loss.eaft_k": 8, "loss.eaft_alpha": 0.5})) == {"k": 8, "alpha": 0.5}
    assert loss_options(valid(**{"loss.name": "eaft"})) == {"k": 20, "alpha": 1.0}  # EAFT's code's values
    sftgo = build_loss("sftgo", **loss_options(valid(**{"loss.lambda_schedule": "linear", "loss.lambda_min": 0.07})))
    assert sftgo.lambda_at(1.0) == pytest.approx(0.07)


# --- against data ------------------------------------------------------------------------------


@pytest.fixture
def tfidf_dir(tmp_path):
    out = tmp_path / "tfidf_only"
    manifest = write_annotated_dir(out, make_examples(6, ["tfidf", "llmlingua2"]), ["tfidf", "llmlingua2"])
    return out, manifest


@pytest.fixture
def loss_dir(tmp_path):
    out = tmp_path / "losses"
    scorers = ["tfidf", "base_loss", "ref_loss"]
    manifest = write_annotated_dir(out, make_examples(6, scorers), scorers)
    return out, manifest


def test_data_check_accepts_a_stored_scorer(tfidf_dir):
    out, manifest = tfidf_dir
    validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "llmlingua2"}), manifest)
    validate_against_data(valid(**{"data.train": str(out), "importance.scope": "corpus"}), manifest)


def test_data_check_missing_scorer_lists_the_offer(tfidf_dir):
    out, manifest = tfidf_dir
    with pytest.raises(ConfigError) as info:
        validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "ref_loss"}), manifest)
    message = str(info.value)
    assert "importance.scorer: 'ref_loss'" in message and str(out) in message
    assert "['tfidf', 'llmlingua2']" in message
    with pytest.raises(ConfigError, match="excess_loss needs both base_loss and ref_loss"):
        validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "excess_loss"}), manifest)


def test_a_loss_that_reads_no_score_trains_without_one(tfidf_dir):
    """eaft (like sft, infosft, dft) reads no score: importance.scorer=none validates on any directory, and a
    missing default score says so."""
    out, manifest = tfidf_dir
    for name in ("eaft", "sft", "infosft", "dft"):
        config = valid(**{"data.train": str(out), "loss.name": name, "importance.scorer": "none", "importance.scope": "corpus"})
        validate(config)
        validate_against_data(config, manifest)
    with pytest.raises(ConfigError, match="loss.name=eaft reads no score: importance.scorer=none trains it without groups"):
        validate_against_data(valid(**{"data.train": str(out), "loss.name": "eaft", "importance.scorer": "base_loss"}), manifest)
    # eval.scorer none: held-out without groups; the training grouping stays.
    validate_eval_data(valid(**{"eval.scorer": "none"}), manifest, "held-out/dir")
    assert eval_grouping(valid(**{"loss.name": "eaft", "importance.scorer": "none"}))[0] == "none"


def test_data_check_names_the_given_directory(tfidf_dir):
    out, manifest = tfidf_dir
    with pytest.raises(ConfigError, match="is not in held-out/dir"):
        validate_against_data(valid(**{"importance.scorer": "nope"}), manifest, uri="held-out/dir")


def test_data_check_excess_loss_and_rho1(loss_dir, tfidf_dir):
    out, manifest = loss_dir
    validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "excess_loss",
                                   "importance.scope": "corpus"}), manifest)
    validate_against_data(valid(**{"data.train": str(out), "loss.name": "rho1"}), manifest)
    other, no_ref = tfidf_dir
    with pytest.raises(ConfigError, match="loss.name: rho1 needs stored ref_loss"):
        validate_against_data(valid(**{"data.train": str(other), "loss.name": "rho1"}), no_ref)


def test_data_check_corpus_scope_needs_score_stats(tfidf_dir):
    out, manifest = tfidf_dir
    manifest.score_stats.pop("tfidf")
    with pytest.raises(ConfigError, match="importance.scope: corpus needs score_stats for 'tfidf'"):
        validate_against_data(valid(**{"data.train": str(out), "importance.scope": "corpus"}), manifest)
    validate_against_data(valid(**{"data.train": str(out), "importance.scope": "batch"}), manifest)


def test_eval_grouping_defaults_to_the_training_grouping_and_each_key_overrides():
    assert eval_grouping(valid(**{"importance.scorer": "llmlingua2", "importance.rho": 0.6})) == ("llmlingua2", 0.6, "sequence")
    assert eval_grouping(valid(**{"importance.scorer": "tfidf", "eval.scorer": "given", "eval.rho": 0.99,
                                  "eval.scope": "corpus"})) == ("given", 0.99, "corpus")
    assert eval_grouping(valid(**{"eval.rho": 0.0})) == ("tfidf", 0.0, "sequence")  # 0 is a value, not "unset"


def test_eval_data_check_needs_only_the_eval_score(tfidf_dir):
    out, manifest = tfidf_dir
    # The training score may be absent from the held-out directory when eval.scorer names another.
    validate_eval_data(valid(**{"importance.scorer": "excess_loss", "eval.scorer": "llmlingua2", "eval.scope": "corpus"}),
                       manifest, "held-out/dir")
    with pytest.raises(ConfigError, match=r"eval.scorer: 'given' is not in held-out/dir; it offers \['tfidf', 'llmlingua2'\]"):
        validate_eval_data(valid(**{"eval.scorer": "given"}), manifest, "held-out/dir")
    manifest.score_stats.pop("tfidf")
    with pytest.raises(ConfigError, match="eval.scope: corpus needs score_stats for 'tfidf' in held-out/dir"):
        validate_eval_data(valid(**{"eval.scorer": "tfidf", "eval.scope": "corpus"}), manifest, "held-out/dir")


# --- saving ------------------------------------------------------------------------------------


def test_save_config_round_trip(tmp_path):
    config = valid(**{"loss.lambda": 0.3, "optim.betas": "[0.8,0.9]", "loss.rho1_rho": 0.2, "report_to": "tensorboard",
                      "data.train": "s3://bucket/dir", "train.dtype": "bfloat16"})
    path = save_config(config, tmp_path / "run" / "config.yaml")
    text = path.read_text()
    assert "lambda: 0.3" in text and not re.search(r"lambda_(?!\w)", text)
    assert load_config(["--config", str(path)]) == config
    assert config_from_dict(yaml.safe_load(text)) == config
    assert yaml.safe_load(text) == to_dict(config)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"checkpoint: unknown key 'optim.l_r'"):
        config_from_dict({"optim": {"l_r": 1}}, source="checkpoint")


def test_data_check_refuses_a_score_without_spread_for_losses_that_use_it(tmp_path):
    """excess_loss of a model against itself (ref_loss = base_loss): sftgo / select / weighted refuse it, naming the
    scorer and the cause; sft, which only logs the groups, trains."""
    scorers = ["tfidf", "base_loss", "ref_loss"]
    examples = make_examples(6, scorers)
    for example in examples:
        example["scores"]["ref_loss"] = example["scores"]["base_loss"].copy()
    out = tmp_path / "self_ref"
    manifest = write_annotated_dir(out, examples, scorers, rows_per_shard=4)
    for loss in ("sftgo", "select", "weighted"):
        with pytest.raises(ConfigError, match=rf"importance.scorer: 'excess_loss' has no spread in {out}: 0 on all .*likely "
                                              r"cause: ref_loss was computed with the base model itself"):
            validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "excess_loss", "loss.name": loss}), manifest)
    validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "excess_loss", "loss.name": "sft"}), manifest)
    validate_against_data(valid(**{"data.train": str(out), "importance.scorer": "tfidf", "loss.name": "sftgo"}), manifest)


def test_the_loss_section_holds_exactly_the_registered_losses_options():
    """LossConfig is written out (keys a reader can open); every registered loss's Options field must be one of its
    fields with the same key, type, default and help, and it holds no other option. A new loss's option fails here
    until its line is added to LossConfig (``loss_option(TheOptions, "field")``)."""
    import dataclasses
    import typing

    from train import config as train_config

    written, implied = train_config.LossConfig, implied_loss_config()
    written_hints, implied_hints = typing.get_type_hints(written), typing.get_type_hints(implied)
    want = {f.name: (f.metadata, f.default, implied_hints[f.name]) for f in dataclasses.fields(implied)}
    have = {f.name: (f.metadata, f.default, written_hints[f.name]) for f in dataclasses.fields(written)}
    assert list(have) == list(want), "LossConfig's fields and the registered losses' options differ"
    for name in want:
        assert have[name] == want[name], name


def test_origin_names_the_command_line_the_file_or_the_default(tmp_path):
    """The loader records where each key was set last; the forms the old argv re-parse missed count too."""
    from data.config import origin

    first = write_yaml(tmp_path / "a.yaml", {"data": {"validation": "shards/demo_val"}})
    second = write_yaml(tmp_path / "b.yaml", {"optim": {"lr": 1e-4}, "data": {"train": "x"}})
    argv = ["--config", first, f"--config={second}"]
    cfg = load_config(argv)
    assert origin(cfg, "data.validation") == f"in {first}"
    assert origin(cfg, "optim.lr") == f"in {second}"
    assert origin(cfg, "data.train") == f"in {second}"
    assert origin(cfg, "seed") == "by default"
    for override in (["data.validation=x"], ["--data.validation", "x"], ["--data.validation=x"], ["data={validation: x}"]):
        assert origin(load_config([*argv, *override]), "data.validation") == "on the command line", override
    assert origin(load_config([*argv, "data.validation=x", "--config", first]), "data.validation") == "on the command line"


# --- the CPU starter config and the slow-first-step warning (issue 30) ----------------------------------


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def test_cpu_starter_config_refuses_without_data_and_resolves_to_what_it_documents():
    from train.plan import slow_cpu_step_warning

    path = CONFIGS / "cpu_starter.yaml"
    text = path.read_text(encoding="utf-8")
    # Every key is commented on its line, and nothing points at the demo's shards or runs.
    keys = [line for line in text.splitlines() if re.match(r"^\s*\w+:\s*\S", line) and not line.lstrip().startswith("#")]
    assert keys and all("  # " in line for line in keys), [line for line in keys if "  # " not in line]
    assert "demo" not in yaml.safe_dump(yaml.safe_load(text))

    with pytest.raises(ConfigError) as info:
        validate(load_config(["--config", str(path)]))
    assert str(info.value) == ("invalid train config:\n  data.train: required: the annotated directory to train on "
                               "(annotate/run.py's --output, or an fsspec URI); pass data.train=DIR on the command line, "
                               "or write it under data: train: in your config file")

    config = load_config(["--config", str(path), "data.train=shards/mine", "data.validation=shards/mine_val"])
    validate(config)
    resolved = _flat(to_dict(config))
    written = _flat(yaml.safe_load(text))
    assert {key: resolved[key] for key in written} == {**written, "data.train": "shards/mine", "data.validation": "shards/mine_val"}
    assert (config.model, config.data.micro_batch_tokens, config.train.gradient_checkpointing, config.loss.name,
            config.importance.scorer, config.importance.rho, config.loss.lambda_, config.optim.lr) == \
        ("smollm2-135m-instruct", 1024, False, "sftgo", "tfidf", 0.7, 0.9, 2e-5)
    assert (config.train.dtype, config.train.zero_stage) == ("auto", "auto")  # float32 and no partitioning on one CPU
    assert slow_cpu_step_warning(config, cuda=False) is None


def test_slow_cpu_step_warning_names_each_setting_to_change():
    from train.plan import CPU_SLOW_MICRO_BATCH_TOKENS, slow_cpu_step_warning

    defaults = valid()  # gradient checkpointing on, 4096-token micro-batches: the 47 s first step
    message = slow_cpu_step_warning(defaults, cuda=False)
    assert message == ("no GPU: this CPU run's first step will be slow (the first log line may take minutes): "
                       "train.gradient_checkpointing is on (recomputes activations in backward, ~30% more compute; host "
                       "RAM rarely needs it): set train.gradient_checkpointing=false; data.micro_batch_tokens is 4096 (a step "
                       "on 2 CPU cores takes ~1 s per 60 tokens with SmolLM2-135M): set data.micro_batch_tokens=1024 "
                       "(train/configs/cpu_starter.yaml has both)")
    assert slow_cpu_step_warning(defaults, cuda=True) is None
    only_checkpointing = slow_cpu_step_warning(valid(**{"data.micro_batch_tokens": CPU_SLOW_MICRO_BATCH_TOKENS}), cuda=False)
    assert "train.gradient_checkpointing=false" in only_checkpointing and "data.micro_batch_tokens" not in only_checkpointing
    only_tokens = slow_cpu_step_warning(valid(**{"data.micro_batch_tokens": CPU_SLOW_MICRO_BATCH_TOKENS + 1,
                                                 "train.gradient_checkpointing": "false"}), cuda=False)
    assert "data.micro_batch_tokens is 2049" in only_tokens and "gradient_checkpointing" not in only_tokens
    assert slow_cpu_step_warning(load_config(["--config", str(CONFIGS / "demo_cpu.yaml")]), cuda=False) is None


def test_a_cpu_run_says_at_start_that_its_first_step_will_be_slow(tmp_path, tiny_llama_dir):
    """The warning is the run's first line, before the data is opened (here: refused) and before DeepSpeed starts."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), f"model={tiny_llama_dir}",
                           f"data.train={tmp_path / 'no_such_shards'}", f"output_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("warning: no GPU: this CPU run's first step will be slow")
    assert "set train.gradient_checkpointing=false" in lines[0] and "set data.micro_batch_tokens=1024" in lines[0]
    assert lines[1].startswith(f"error: data.train (set on the command line): {tmp_path / 'no_such_shards'} is not a valid")
    assert "built successfully" not in proc.stdout + proc.stderr  # refused before DeepSpeed starts
