"""The system-prompt choice of the data (annotate --system-prompt) as the trainer and evaluation.run see it:
data.system_prompt must match the shards' (a manifest without one means default), and evaluate generates
with the run's own choice."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from data.config import ConfigError
from data.render import prompt_text
from schemas.shard import tokenizer_fingerprint
from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir
from evaluation import run as ev
from train.config import load_config, validate_against_data, validate_eval_data


def _shards(path, smol_tokenizer, choice=None):
    return write_annotated_dir(path, make_examples(12, ["tfidf"], min_len=6, max_len=30), ["tfidf"],
                               tokenizer_fp=tokenizer_fingerprint(smol_tokenizer, choice))


def test_config_refuses_data_of_another_choice_naming_both_and_the_directory(tmp_path, smol_tokenizer):
    manifest = _shards(tmp_path / "none", smol_tokenizer, "none")
    assert manifest.tokenizer["system_prompt"] == "none"
    cfg = load_config([f"data.train={tmp_path / 'none'}"])
    assert cfg.data.system_prompt == "default"
    with pytest.raises(ConfigError) as info:
        validate_against_data(cfg, manifest)
    message = str(info.value)
    assert f"data.system_prompt: {tmp_path / 'none'} was rendered with system prompt 'none'" in message
    assert "data.system_prompt is 'default'" in message and "--system-prompt 'default'" in message
    with pytest.raises(ConfigError, match="rendered with system prompt 'none'"):
        validate_eval_data(cfg, manifest, "val/")
    validate_against_data(load_config([f"data.train={tmp_path / 'none'}", "data.system_prompt=none"]), manifest)


def test_shards_from_before_the_choice_count_as_default(tmp_path, smol_tokenizer):
    old = _shards(tmp_path / "old", smol_tokenizer)  # a fingerprint without system_prompt
    assert "system_prompt" not in old.tokenizer
    validate_against_data(load_config([f"data.train={tmp_path / 'old'}"]), old)
    with pytest.raises(ConfigError, match="rendered with system prompt 'default'"):
        validate_against_data(load_config([f"data.train={tmp_path / 'old'}", "data.system_prompt=none"]), old)


def test_trainer_refuses_before_training(tmp_path, smol_tokenizer, tiny_llama_dir):
    _shards(tmp_path / "shards", smol_tokenizer, "Answer briefly.")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    args = [sys.executable, str(REPO / "train" / "main.py"), f"model={tiny_llama_dir}", f"data.train={tmp_path / 'shards'}",
            "loss.name=sft", f"output_dir={tmp_path / 'run'}", "data.micro_batch_tokens=64", "--dry-run"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (f"data.system_prompt: {tmp_path / 'shards'} was rendered with system prompt 'Answer briefly.' "
            f"(annotate --system-prompt), but data.system_prompt is 'default'") in proc.stderr
    proc = subprocess.run([*args, "data.system_prompt=Answer briefly."], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class _Recorder:
    """A model whose generate records the prompt ids and answers nothing."""

    generation_config = SimpleNamespace(eos_token_id=2)

    def __init__(self):
        self.prompts = []

    def generate(self, input_ids, **_):
        self.prompts.append(input_ids[0].tolist())
        return input_ids


def test_evaluate_generates_with_the_runs_choice(tmp_path, smol_tokenizer):
    for name, choice in (("plain", None), ("none", "none")):
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
        (tmp_path / name / "config.yaml").write_text("model: tiny\n" + (f"data:\n  system_prompt: {choice}\n" if choice else ""))
    runs = [ev.resolve_run(str(tmp_path / "plain")), ev.resolve_run(str(tmp_path / "none"))]
    args = ev.build_parser().parse_args([str(tmp_path / "plain"), str(tmp_path / "none")])
    ev.configure_runs(runs, args)
    assert [run.system_prompt for run in runs] == ["default", "none"]
    recorder = _Recorder()
    for run in runs:
        ev.generate_answers(recorder, smol_tokenizer, ["Say hi."], 4, torch.device("cpu"), run.system_prompt)
    with_turn, without = (smol_tokenizer.decode(ids) for ids in recorder.prompts)
    assert with_turn.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert without == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n" == prompt_text(smol_tokenizer, "Say hi.", "none")
    # --system-prompt overrides every run's.
    args = ev.build_parser().parse_args([str(tmp_path / "none"), "--system-prompt", "Be terse."])
    runs = [ev.resolve_run(str(tmp_path / "none"))]
    ev.configure_runs(runs, args)
    assert runs[0].system_prompt == "Be terse."


def test_evaluate_refuses_heldout_of_another_choice_than_the_runs_training_and_generates_with_it(
        tmp_path, smol_tokenizer, tiny_llama_dir, capsys):
    """A run trained on `none` shards: held-out shards rendered `default` are refused before any model loads, naming
    both choices; `none` held-out shards are evaluated, and the generations are rendered with `none` too."""
    import json
    import shutil

    run = tmp_path / "run_none"
    shutil.copytree(tiny_llama_dir, run / "model")
    (run / "config.yaml").write_text("model: tiny\ndata:\n  train: shards/none\n  system_prompt: none\n")
    _shards(tmp_path / "val_default", smol_tokenizer)  # from before the choice existed: default
    _shards(tmp_path / "val_none", smol_tokenizer, "none")
    out = tmp_path / "evaluation.json"

    assert ev.main([str(run), "--heldout", str(tmp_path / "val_default"), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"error: --heldout {tmp_path / 'val_default'} was rendered with system prompt 'default' (annotate --system-prompt), "
        f"but run {run} trained on shards rendered with 'none' (its data.system_prompt); held-out losses are only "
        f"comparable on the same rendering: annotate the held-out data with --system-prompt 'none'\n")
    assert not out.exists()
    # --system-prompt sets the generations' rendering only: the held-out shards are still held to the training one.
    assert ev.main([str(run), "--heldout", str(tmp_path / "val_default"), "--system-prompt", "default",
                    "--output", str(out)]) == 2
    # A model without a training config (the base model) is held to no choice.
    args = ev.build_parser().parse_args([str(tiny_llama_dir), "--heldout", str(tmp_path / "val_default")])
    assert [r.trained_system_prompt for r in ev.check_inputs(args)[0]] == [None]

    assert ev.main([str(run), "--heldout", str(tmp_path / "val_none"), "--max-new-tokens", "2", "--prompts",
                    str(_prompt_file(tmp_path)), "--output", str(out)]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert result["system_prompt"] == "none" and result["request"]["system_prompt"] == "none"
    assert result["heldout"][0]["dir"] == str(tmp_path / "val_none") and result["heldout"][0]["tokens"] > 0
    assert [g["prompt"] for g in result["generations"]] == ["Say hi."]


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Say hi.\n")
    return path
