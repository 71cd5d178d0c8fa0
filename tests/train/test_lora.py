"""LoRA adapters (``lora.*``, train/lora.py): what trains, the ZeRO plan, export and merge, and every ZeRO stage.

In-process (tiny random Llama, real PEFT, no DeepSpeed): only the adapters train and every one of them gets a
gradient through non-reentrant gradient checkpointing; the output head and unknown modules are refused naming
``lora.target_modules``; the exported adapter folder loads with PEFT on its base and gives the trained model's
logits, and the merged folder loads with AutoModelForCausalLM and gives them to 1e-5.

On real DeepSpeed engines (gloo, CPU; 1 and 2 ranks, the trainer's own load_model / build_engine / train_step /
export_model on its own shard stream): stages 0-3 train the same adapter steps, every loss trains the adapters and
leaves the base untouched, and the export of each stage is the same adapter. The kill -9 resume and the export
through train/main.py are tests/train/test_main.py's, parametrised with LoRA.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from data.config import ConfigError
from schemas.shard import tokenizer_fingerprint
from tests.conftest import REPO
from tests.train.conftest import make_examples, run_gloo_ranks, write_annotated_dir
from train import config as train_config
from train.engine import count_parameters
from train.forward import token_losses
from train.lora import add_adapters, count_trainable, load_causal_lm, merge_adapter, peft_model_of, save_adapter


def _cfg(*overrides: str) -> train_config.TrainConfig:
    return train_config.load_config(["data.train=x", "lora.rank=4", *overrides])


def _lora_model(model_dir: Path, *overrides: str, checkpointing: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = add_adapters(model, _cfg(*overrides).lora, str(model_dir))
    if checkpointing:  # as train.engine.load_model: after the adapters, non-reentrant
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def _row(seed: int = 0, lens: tuple[int, ...] = (9, 14, 11)) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (sum(lens),), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    return ids, pos, list(lens), (torch.rand(sum(lens), generator=g) < 0.7) & (pos != 0)


def _randomise_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B matrices (PEFT starts them at 0, which would make every comparison trivially the base's)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=-1"], "lora.rank: -1 must be >= 0"),
    (["lora.alpha=0"], "lora.alpha: 0.0 must be a finite number > 0"),
    (["lora.dropout=1.0"], "lora.dropout: 1.0 must be in [0, 1)"),
    (["lora.target_modules=[]"], "lora.target_modules: [] must name modules"),
    (["lora.target_modules=q_proj,lm_head"], "lora.target_modules: ['lm_head']: the output head and the embeddings get no adapters"),
    (["lora.target_modules=model.embed_tokens"], "lora.target_modules: ['model.embed_tokens']"),
    (["lora.quantize=8bit"], "lora.quantize: '8bit' is not one of ['none', '4bit']"),
    (["lora.rank=0", "lora.quantize=4bit"], "lora.quantize: needs LoRA on: set lora.rank"),
    (["lora.rank=0", "lora.export_merged=true"], "lora.export_merged: needs LoRA on: set lora.rank"),
])
def test_bad_lora_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        train_config.validate(_cfg(*overrides))
    assert message in str(info.value)


def test_qlora_is_refused_where_bitsandbytes_cannot_quantize_and_at_zero_stage_3_naming_the_key(monkeypatch):
    section = _cfg("lora.quantize=4bit").lora
    assert train_config.lora_problems(section, "auto", cuda=True) == []
    assert train_config.lora_problems(section, "auto", cuda=False, cpu_4bit=True) == []
    assert train_config.lora_problems(section, "auto", cuda=False, cpu_4bit=False) == [
        "lora.quantize: 4bit (QLoRA) found no CUDA device, and the installed bitsandbytes cannot quantize to 4 bits on "
        "the CPU (no CPU backend in this build; the locked 0.50.2 has one: pip install -e '.[qlora]'); or set "
        "lora.quantize=none to train the adapters on the unquantized base"]
    assert train_config.lora_problems(section, "3", cuda=True) == [
        "lora.quantize: 4bit does not run under ZeRO-3 here (4-bit weights are not partitioned): set train.zero_stage to 0, 1, 2 or auto"]
    real_find_spec = importlib.util.find_spec  # bitsandbytes not installed: named with the extra that installs it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=re.escape("lora.quantize: 4bit (QLoRA) needs the bitsandbytes package (pip install -e '.[qlora]')")):
        train_config.validate(_cfg("lora.quantize=4bit"))


def test_this_machine_quantizes_to_4_bits_with_the_locked_bitsandbytes():
    """make setup installs the qlora extra (bitsandbytes 0.50.2), whose CPU backend quantizes: QLoRA runs here."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed")
    assert train_config.bitsandbytes_quantizes_on_cpu()
    train_config.validate(_cfg("lora.quantize=4bit"))  # not refused


def test_peft_imports_without_bitsandbytes_asking_for_a_hub_kernel():
    """With the qlora extra, every import of peft imports bitsandbytes, which on AVX512-BF16 CPUs warns that the
    `kernels` package (a Hub download) is missing; the train package quiets that line, and only that line."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed")
    proc = subprocess.run([sys.executable, "-c", "import train.lora, peft, logging; "
                           "print(logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel())"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["40"], proc.stdout + proc.stderr
    assert "kernels" not in proc.stderr, proc.stderr


def test_lora_keys_decide_the_weights_only_when_lora_is_on():
    off = train_config.weight_keys(train_config.load_config(["data.train=x"]))
    assert not any(key.startswith("lora.") for key in off)  # a full run's identity is what it was before lora existed
    on = train_config.weight_keys(_cfg())
    assert on["lora.rank"] == 4 and on["lora.target_modules"] == ["all-linear"] and "lora.export_merged" not in on


def test_a_checkpoint_of_other_trained_weights_is_refused(tmp_path):
    from train.checkpoint import check_resumable
    from train.shards import STATE_VERSION

    ckpt = tmp_path / "step_2"
    ckpt.mkdir()
    (ckpt / "rng_rank0.json").write_text("{}")
    (ckpt / "data_rank0.json").write_text(json.dumps({"version": STATE_VERSION}))
    identity = train_config.weight_keys(_cfg())
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "zero_stage": 0, "world_size": 1, "identity": identity}))
    check_resumable(ckpt, 0, 1, _cfg().lora)
    with pytest.raises(ValueError, match=r"holds LoRA adapters of rank 4 on \['all-linear'\]; this run trains full weights"):
        check_resumable(ckpt, 0, 1, train_config.load_config(["data.train=x"]).lora)
    with pytest.raises(ValueError, match=r"this run trains LoRA adapters of rank 8 .*lora.rank, lora.target_modules"):
        check_resumable(ckpt, 0, 1, _cfg("lora.rank=8").lora)


def test_the_zero_plan_counts_optimizer_states_for_the_adapters_only(tiny_llama_dir):
    from train.engine import choose_zero_stage

    n, trainable = count_parameters(str(tiny_llama_dir)), count_trainable(str(tiny_llama_dir), _cfg().lora)
    # all-linear on 2 layers of width 64 (q, k, v, o, gate, up, down): r * (in + out) each.
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + 3 * (64 + 128))
    device = n * 16 * 1.5  # full training does not fit half of it; the frozen base (4 B a weight) does
    with pytest.raises(ValueError, match="do not fit one rank"):
        choose_zero_stage("auto", None, n, "float32", 1, device)
    plan = choose_zero_stage("auto", None, n, "float32", 1, device, trainable_params=trainable)
    assert plan.stage == 0 and "frozen params x 4 B + 0.01M adapter params x 16 B" in plan.why
    # QLoRA: the frozen base at half a byte a weight; two ranks that must partition it are sent to stage 3 (refused later)
    plan = choose_zero_stage("auto", None, n, "float32", 2, n * 4, trainable_params=trainable, quantized=True)
    assert plan.stage == 2 and f"~{(n * 0.5 + trainable * 16) / 2**30:.2f} GiB" in plan.why
    assert "frozen params x 0.5 B (4-bit NF4) + 0.01M adapter params x 16 B" in plan.why
    assert choose_zero_stage("auto", None, n, "float32", 2, n * 4, trainable_params=trainable).stage == 3


# ---------------------------------------------------------------------------------------------
# What trains (no DeepSpeed)
# ---------------------------------------------------------------------------------------------


def test_only_the_adapters_train_and_each_gets_a_gradient_through_checkpointing(tiny_llama_dir):
    model = _lora_model(tiny_llama_dir)
    assert peft_model_of(model) is not None and model.is_gradient_checkpointing
    assert type(model).__name__ == "LlamaForCausalLM"  # DeepSpeed trains the transformers model, adapters inside
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == count_trainable(str(tiny_llama_dir), _cfg().lora)
    model.train()
    _randomise_adapters(model)  # so that A gets a gradient too (with B = 0 only B would)
    token_losses(model, *_row(), chunk_size=8).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("targets, problem", [("q_proj,lm_head", "output head"), ("no_such_proj", "not found in the base model"),
                                              ("q_proj,v_prj", r"\['v_prj'\] match no module of the model \(its linear layers: "
                                                                r"\['down_proj', .*'v_proj'\]\)")])
def test_targets_that_cannot_train_are_refused_naming_the_key(tiny_llama_dir, targets, problem):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    section = _cfg(f"lora.target_modules={targets}").lora
    with pytest.raises(ValueError, match=rf"lora.target_modules: .*{problem}"):
        add_adapters(model, section, str(tiny_llama_dir))


def test_adapter_folder_loads_with_peft_and_merged_folder_gives_the_same_logits(tmp_path, tiny_llama_dir):
    from peft import PeftModel

    model = _lora_model(tiny_llama_dir, "lora.target_modules=q_proj,v_proj,down_proj", "lora.alpha=3", checkpointing=False)
    _randomise_adapters(model)
    model.eval()
    ids = _row()[0][None]
    with torch.no_grad():
        trained = model(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
    assert (trained - base_logits).abs().max() > 1e-3  # the adapters change the model

    folder = tmp_path / "model"
    save_adapter(model, model.state_dict(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_llama_dir).resolve())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 3.0, "LORA")
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    loaded = PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained, rtol=0, atol=1e-6)

    (folder / "generation_config.json").write_text("{}")  # the trainer writes one beside the adapter
    merge_adapter(folder, tmp_path / "model_merged", torch.float32, card="merged card")
    assert not any(p.name.startswith("adapter") for p in (tmp_path / "model_merged").iterdir())
    assert (tmp_path / "model_merged" / "README.md").read_text() == "merged card"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model_merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, rtol=0, atol=1e-5)
        torch.testing.assert_close(load_causal_lm(str(folder), torch.float32).eval()(ids).logits, trained, rtol=0, atol=1e-5)


def test_an_adapter_whose_base_is_gone_says_so(tmp_path, tiny_llama_dir):
    from train.lora import adapter_base

    model = _lora_model(tiny_llama_dir, checkpointing=False)
    save_adapter(model, model.state_dict(), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved_away")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"is a LoRA adapter of {tmp_path / 'moved_away'}, which is not here"):
        adapter_base(tmp_path / "adapter")


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed engines: every ZeRO stage on 1 and 2 ranks, every loss
# ---------------------------------------------------------------------------------------------

_WORKER = r'''
import gc, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from train import config as tc
from train.checkpoint import seed_all
from train.engine import build_engine, export_model, load_model, setup_distributed
from train.forward import token_losses
from train.losses import build_loss
from train.plan import open_data, open_stream
from train.step import next_step_batches, train_step

model_dir, shards, out, cases = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4].split(",")
torch.set_num_threads(1)
rank, world, device = setup_distributed()
# Frozen weights (name in the trained model, name in the base), compared with the base after training.
PROBES = {"model.layers.0.self_attn.q_proj.base_layer.weight": "model.layers.0.self_attn.q_proj.weight",
          "model.embed_tokens.weight": "model.embed_tokens.weight"}
base = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
results = {}
for case in cases:  # "<stage>:<loss>"
    stage, loss = case.split(":")
    cfg = tc.load_config([f"model={model_dir}", f"data.train={shards}", "data.micro_batch_tokens=96", f"loss.name={loss}",
                          "importance.scorer=tfidf", "train.grad_accum=2", "train.max_steps=3", "optim.lr=1e-2",
                          "optim.warmup_steps=0", "lora.rank=4", "lora.dropout=0.1", f"train.zero_stage={stage}",
                          f"output_dir={out / case.replace(':', '_')}"])
    tc.validate(cfg)
    model_path, tokenizer, manifest, _ = open_data(cfg)
    ds = tc.deepspeed_dict(cfg, world_size=world, dtype="float32", zero_stage=int(stage))
    stream, _, total = open_stream(cfg, manifest, world)
    seed_all(cfg.seed)
    model = load_model(cfg, model_path, ds, torch.float32, "sdpa")
    engine, _ = build_engine(model, cfg, ds, total)
    loss_fn = build_loss(cfg.loss.name, **tc.loss_options(cfg))
    batches = stream.micro_batches(cfg.data.micro_batch_tokens)
    engine.module.train()
    losses, first = [], None
    for step in range(total):
        micro = next_step_batches(batches, cfg.train.grad_accum, 2, device)
        first = micro if first is None else first
        parts, _, _ = train_step(engine, micro, loss_fn, cfg, None, step / max(1, total - 1), device)
        value = torch.tensor([sum(p["loss"] for p in parts)], dtype=torch.float64)
        dist.all_reduce(value)
        losses.append(float(value))
    with torch.no_grad():  # the first step's micro-batches again, after training: their CE (all ranks)
        ce = torch.zeros(2, dtype=torch.float64)
        for b in first:
            ce[0] += token_losses(engine.module, b.input_ids, b.position_ids, list(b.seq_lens), b.loss_mask).double().sum()
            ce[1] += int(b.loss_mask.sum())
        dist.all_reduce(ce)
    folder = out / case.replace(":", "_") / "model"
    export_model(engine, tokenizer, folder, rank, "card")
    import deepspeed
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([params[n] for n in PROBES], enabled=int(stage) == 3):
        base_kept = all(torch.equal(params[n].detach().cpu(), base[b].detach()) for n, b in PROBES.items())
    optimized = sum(getattr(p, "ds_numel", p.numel()) for g in engine.optimizer.param_groups for p in g["params"]) if int(stage) == 0 else None
    results[case] = {"losses": losses, "base_kept": base_kept, "folder": str(folder), "optimized": optimized,
                     "first_ce_after": float(ce[0] / ce[1])}
    # One model per process in the trainer; here the next case's load must not see this one's ZeRO-3 config (transformers
    # holds it by a weak reference, which DeepSpeed's own references to the engine keep alive).
    del engine, model
    unset_hf_deepspeed_config()
    gc.collect()
if rank == 0:
    (out / "result.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
'''


@pytest.fixture(scope="module")
def shards(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("lora_shards")
    fp = tokenizer_fingerprint(smol_tokenizer)
    scorers = ["tfidf", "base_loss", "ref_loss"]
    write_annotated_dir(root / "train", make_examples(48, scorers, min_len=8, max_len=40), scorers, tokenizer_fp=fp, rows_per_shard=16)
    return root / "train"


def run_worker(tmp_path: Path, model_dir: Path, shards: Path, ranks: int, cases: list[str], timeout: float = 900) -> dict:
    """The worker on ``ranks`` gloo ranks (plain python, the launcher's environment set by hand)."""
    script = tmp_path / "lora_worker.py"
    script.write_text(_WORKER, encoding="utf-8")
    run_gloo_ranks(script, [str(model_dir), str(shards), str(tmp_path), ",".join(cases)], ranks, tmp_path, timeout)
    return json.loads((tmp_path / "result.json").read_text())


def _adapter(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_every_zero_stage_trains_the_same_adapters_and_every_loss_trains_them(tmp_path, tiny_llama_dir, shards, ranks):
    """Stages 0-3 with sftgo: the same step losses and the same exported adapter as stage 0, the base untouched; with
    ZeRO-3 (one rank) or 2 (two ranks), every registered loss trains the adapters (finite losses, the adapter moves)."""
    from train.losses import LOSSES

    every_loss_stage = "3" if ranks == 1 else "2"
    cases = [f"{stage}:sftgo" for stage in "0123"] + [f"{every_loss_stage}:{loss}" for loss in LOSSES if loss != "sftgo"]
    results = run_worker(tmp_path, tiny_llama_dir, shards, ranks, cases)
    reference = results["0:sftgo"]
    assert len(reference["losses"]) == 3 and reference["optimized"] == count_trainable(str(tiny_llama_dir), _cfg().lora)
    first = _adapter(reference["folder"])
    assert first and all(".lora_A." in k or ".lora_B." in k for k in first)
    assert any(v.abs().max() > 0 for k, v in first.items() if ".lora_B." in k)  # B starts at 0: it trained
    for case, result in results.items():
        assert result["base_kept"], case
        assert all(torch.isfinite(torch.tensor(result["losses"]))), case
        adapter = _adapter(result["folder"])
        assert adapter.keys() == first.keys(), case
        if case.endswith(":sftgo"):
            assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5), case
            for key in first:
                torch.testing.assert_close(adapter[key], first[key], rtol=1e-4, atol=1e-6, msg=f"{case} {key}")
        else:
            assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k), case
        if case.endswith(":sft"):  # the adapters learn: step 1's data (its loss is its CE) has a lower CE after 3 steps
            assert result["first_ce_after"] < result["losses"][0] - 0.01, result
        card = (Path(result["folder"]) / "README.md").read_text()
        assert card == "card"


# ---------------------------------------------------------------------------------------------
# QLoRA through train/main.py, bf16 (DeepSpeed's bf16 optimizer at stage 1): on the CPU (bitsandbytes' CPU backend)
# and, marked gpu, on CUDA. The fp32 kill -9 resume on 2 ranks is test_main.py's case 2rank-zeroauto-qlora.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_qlora_trains_adapters_on_a_4bit_base_and_exports_them(tmp_path, tiny_llama_dir, shards, device):
    """train/main.py with lora.quantize=4bit in bf16 on one rank (the GPU, or the CPU): the base loads in 4-bit NF4, the
    adapters train (bf16, the stage auto picks), the adapter folder loads with PEFT on the unquantised base and the merged
    folder gives its logits."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    from peft import PeftModel

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    args = [f"model={tiny_llama_dir}", f"data.train={shards}", "data.micro_batch_tokens=96", "importance.scorer=tfidf",
            "train.max_steps=3", "optim.lr=1e-2", "lora.rank=4", "lora.quantize=4bit", "lora.export_merged=true",
            "checkpoint.every=2", "train.dtype=bfloat16", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    frozen = count_parameters(str(tiny_llama_dir))  # the base's parameters, not the packed 4-bit storage's elements
    assert f"lora: rank 4, alpha 8, dropout 0 on all-linear (base in 4-bit NF4): 8,192 adapter parameters train, the {frozen:,} of the base are frozen" in proc.stdout
    assert "zero stage 1:" in proc.stdout
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert "base in 4-bit NF4 while training (QLoRA)" in (out / "model" / "README.md").read_text()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "model_merged", dtype=torch.float32).eval()
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():  # the merged folder is bf16 (the training dtype): bf16 rounding of the weights
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=0.05)
