"""End-to-end: train/main.py with DeepSpeed ZeRO-3 on CPU, through `python` and the `deepspeed` launcher.

Train a few steps, checkpoint, kill -9, resume, finish, export, reload; with 1 rank and with 2 ranks.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from schemas.shard import tokenizer_fingerprint
from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("train_shards")
    fp = tokenizer_fingerprint(smol_tokenizer)
    fp["name"] = "tiny"
    write_annotated_dir(root / "train", make_examples(48, ["tfidf", "base_loss", "ref_loss"], min_len=8, max_len=40),
                        ["tfidf", "base_loss", "ref_loss"], tokenizer_fp=fp, rows_per_shard=16)
    write_annotated_dir(root / "val", make_examples(12, ["tfidf", "base_loss", "ref_loss"], seed=1, prefix="val"),
                        ["tfidf", "base_loss", "ref_loss"], tokenizer_fp=fp)
    return root


def _config(tmp_path, tiny_llama_dir, shards, **overrides) -> Path:
    lines = {
        "model": str(tiny_llama_dir), "output_dir": str(tmp_path / "run"),
        "data.train": str(shards / "train"), "data.validation": str(shards / "val"), "data.micro_batch_tokens": 96,
        "importance.scorer": "tfidf", "importance.rho": 0.7, "loss.name": "sftgo", "optim.lr": 1e-3,
        "optim.warmup_steps": 1, "train.max_steps": 6, "train.grad_accum": 2, "train.gradient_checkpointing": True,
        "train.epochs": 10, "checkpoint.every": 2, "eval.every": 3, "eval.max_batches": 2,
    }
    lines.update(overrides)
    return [f"{k}={v}" for k, v in lines.items()]


def _env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _launch(args, ranks: int, log: Path, launcher: str = "deepspeed") -> subprocess.Popen:
    if launcher == "python":
        cmd = [sys.executable, str(REPO / "train" / "main.py"), *args]
    else:
        port = str(29500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port,
               str(REPO / "train" / "main.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _run(args, ranks: int, log: Path, timeout: int = 600, launcher: str = "deepspeed") -> None:
    proc = _launch(args, ranks, log, launcher)
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _metrics(run: Path) -> dict[int, dict]:
    """Last logged training record per step (a resumed run logs the redone steps again)."""
    records = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            records[record["step"]] = record
    return records


def _cleanup_shm():
    for path in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        try:
            os.unlink(path)
        except OSError:
            pass


@pytest.mark.parametrize("ranks", [1, 2])
def test_train_kill_resume_export(tmp_path, tiny_llama_dir, shards, ranks):
    """Through the `deepspeed` launcher; the uninterrupted reference run uses plain `python` with 1 rank."""
    try:
        reference = tmp_path / "reference"
        _run(_config(reference, tiny_llama_dir, shards), ranks, tmp_path / "reference.log",
             launcher="python" if ranks == 1 else "deepspeed")
        ref_metrics = _metrics(reference / "run")
        assert sorted(ref_metrics) == [1, 2, 3, 4, 5, 6]
        assert all(r["trainable_tokens"] > 0 and r["loss"] > 0 for r in ref_metrics.values())
        assert "eval_ce" in ref_metrics[3] and "eval_important_loss" in ref_metrics[6]

        # Kill -9 once the step-4 checkpoint is complete, then rerun the same command: it resumes.
        interrupted = tmp_path / "interrupted"
        args = _config(interrupted, tiny_llama_dir, shards)
        proc = _launch(args, ranks, tmp_path / "first.log")
        marker = interrupted / "run" / "checkpoints" / "step_4" / "COMPLETED"
        deadline = time.time() + 600
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _run(args, ranks, tmp_path / "resume.log")
        assert "resumed from" in (tmp_path / "resume.log").read_text()
        resumed = _metrics(interrupted / "run")
        for step in (5, 6):  # the steps after the checkpoint match the uninterrupted run
            for key in ("loss", "ce", "important_loss", "unimportant_loss", "trainable_tokens", "lr"):
                assert resumed[step][key] == pytest.approx(ref_metrics[step][key], rel=1e-5, abs=1e-6), (step, key)

        # The exported folder is a standard HF model, trained (differs from the start), tied embeddings kept.
        model = AutoModelForCausalLM.from_pretrained(interrupted / "run" / "model")
        initial = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        assert model.config.tie_word_embeddings
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert not torch.allclose(model.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
        ref_model = AutoModelForCausalLM.from_pretrained(reference / "run" / "model")
        for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        saved = (interrupted / "run" / "config.yaml").read_text()
        assert "rho: 0.7" in saved and "name: sftgo" in saved
    finally:
        _cleanup_shm()


def test_bad_input_fails_before_training(tmp_path, tiny_llama_dir, shards):
    log = tmp_path / "bad.log"
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"importance.scorer": "llmlingua2"}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "llmlingua2" in log.read_text() and "tfidf" in log.read_text()
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"loss.lambda": 1.5}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "loss.lambda" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # NaN scores are found by the validation that runs before step 1 (data.deep_validate, on by default).
    fp = json.loads((shards / "train" / "manifest.json").read_text())["tokenizer"]
    examples = make_examples(8, ["tfidf"], min_len=8, max_len=20)
    examples[3]["scores"]["tfidf"][-1] = float("nan")
    write_annotated_dir(tmp_path / "nan", examples, ["tfidf"], tokenizer_fp=fp)
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"data.train": str(tmp_path / "nan")}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "shard-00000.parquet: row 3: score_tfidf holds NaN" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
