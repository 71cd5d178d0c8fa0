"""End-to-end: train/main.py with DeepSpeed on CPU, through `python` and the `deepspeed` launcher.

Train a few steps, checkpoint, kill -9 mid-save, resume, finish, export, reload; with 1 rank, 2 ranks and
two nodes (torchrun --nnodes 2), at every ZeRO stage. Every stage computes the same step as plain torch (gradient accumulation included).
"""

import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from schemas.shard import MANIFEST_NAME, tokenizer_fingerprint
from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir
from train import config as train_config

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


def _env(**extra):
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _launch(args, ranks: int, log: Path, launcher: str = "deepspeed", env: dict | None = None) -> subprocess.Popen:
    if launcher == "python":
        cmd = [sys.executable, str(REPO / "train" / "main.py"), *args]
    elif launcher == "torchrun-nodes":
        # Two nodes on this machine, each with its own ranks, as on two hosts: one `torchrun --nnodes 2
        # --node_rank R` per node, both meeting at node 0's address, under one bash (kill it with _kill_tree).
        port = str(29600 + os.getpid() % 1000)
        per_node = ranks // 2
        node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(per_node),
                "--master_addr", "127.0.0.1", "--master_port", port]
        node = shlex.join(node)
        script = shlex.join([str(REPO / "train" / "main.py"), *args])
        both = (f"{node} --node_rank 0 {script} & first=$!; {node} --node_rank 1 {script} & second=$!; "
                "wait $first; a=$?; wait $second; b=$?; exit $(( a > b ? a : b ))")
        cmd = ["bash", "-c", both]
    else:
        port = str(29500 + os.getpid() % 1000)
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port,
               str(REPO / "train" / "main.py"), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launch and every process under it, as a machine's power loss would (torchrun starts its
    ranks in sessions of their own, out of reach of a process-group kill)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid)
        victims = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def _run(args, ranks: int, log: Path, timeout: int = 600, launcher: str = "deepspeed", env: dict | None = None) -> None:
    proc = _launch(args, ranks, log, launcher, env)
    try:
        assert proc.wait(timeout=timeout) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            _kill_tree(proc)


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


# (ranks, train.zero_stage, the stage it must resolve to, launcher, adapters): auto is 0 on one rank and 2 on two.
# The 2-node case: two nodes (torchrun --nnodes 2, one rank each) against one node's two ranks. lora: adapters of
# rank 4 with dropout (its RNG must resume too), exported as PEFT's adapter folder and merged (tests/train/test_lora.py);
# qlora: the same on a base loaded in 4-bit NF4 (bitsandbytes' CPU backend here; the qlora extra).
STAGES = [(1, "auto", 0, "deepspeed", ""), (1, "3", 3, "deepspeed", ""), (2, "auto", 2, "deepspeed", ""),
          (2, "1", 1, "deepspeed", ""), (2, "3", 3, "torchrun-nodes", ""),
          (1, "auto", 0, "deepspeed", "lora"), (2, "3", 3, "deepspeed", "lora"), (2, "auto", 2, "deepspeed", "qlora")]
ADAPTERS = {"lora": {"lora.rank": 4, "lora.dropout": 0.1, "lora.export_merged": "true"},
            "qlora": {"lora.rank": 4, "lora.dropout": 0.1, "lora.export_merged": "true", "lora.quantize": "4bit"}}


@pytest.mark.parametrize("ranks,zero_stage,resolved,launcher,lora", STAGES,
                         ids=[f"{r}rank-zero{z}" + ("-2nodes" if l != "deepspeed" else "") + (f"-{a}" if a else "")
                              for r, z, _, l, a in STAGES])
def test_train_kill_resume_export(tmp_path, tiny_llama_dir, shards, ranks, zero_stage, resolved, launcher, lora):
    """Through the `deepspeed` launcher (or torchrun on two nodes); the uninterrupted reference run uses
    plain `python` with 1 rank, the `deepspeed` launcher with 2 on one node."""
    problems = train_config.lora_problems(train_config.LoraConfig(rank=4, quantize="4bit"), "auto") if lora == "qlora" else []
    if problems:
        pytest.skip(f"QLoRA does not run here: {problems}")
    keys = {"train.zero_stage": zero_stage, **ADAPTERS.get(lora, {})}
    try:
        reference = tmp_path / "reference"
        _run(_config(reference, tiny_llama_dir, shards, **keys), ranks,
             tmp_path / "reference.log", launcher="python" if ranks == 1 else "deepspeed")
        assert f"zero stage {resolved}:" in (tmp_path / "reference.log").read_text()
        assert ("(base in 4-bit NF4)" in (tmp_path / "reference.log").read_text()) == (lora == "qlora")
        ref_metrics = _metrics(reference / "run")
        assert sorted(ref_metrics) == [1, 2, 3, 4, 5, 6]
        assert all(r["trainable_tokens"] > 0 and r["loss"] > 0 for r in ref_metrics.values())
        assert "eval_ce" in ref_metrics[3] and "eval_important_loss" in ref_metrics[6]

        # Kill -9 while the step-4 checkpoint is being saved, then rerun the same command: it resumes from
        # the last complete one, step 2. A kill that lands after the save finished (the save of this tiny
        # model takes milliseconds) is turned into one that landed mid-save: the COMPLETED marker, written
        # last, removed and a checkpoint file cut short, which is what such a kill leaves on disk.
        interrupted = tmp_path / "interrupted"
        args = _config(interrupted, tiny_llama_dir, shards, **keys)
        proc = _launch(args, ranks, tmp_path / "first.log", launcher)
        saving = interrupted / "run" / "checkpoints" / "step_4"
        deadline = time.time() + 600
        while not saving.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert saving.exists(), (tmp_path / "first.log").read_text()[-3000:]
        _kill_tree(proc)
        if (saving / "COMPLETED").exists():
            (saving / "COMPLETED").unlink()
            largest = max((p for p in saving.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            with open(largest, "r+b") as f:
                f.truncate(largest.stat().st_size // 2)
        assert (interrupted / "run" / "checkpoints" / "step_2" / "COMPLETED").exists()
        _run(args, ranks, tmp_path / "resume.log", launcher=launcher)
        assert f"resumed from {interrupted / 'run' / 'checkpoints' / 'step_2'} at step 2" in (tmp_path / "resume.log").read_text()
        assert "reduce_scatter_tensor` is deprecated" not in (tmp_path / "resume.log").read_text()  # silenced: per step
        resumed = _metrics(interrupted / "run")
        for step in (3, 4, 5, 6):  # the steps after the checkpoint match the uninterrupted run
            for key in ("loss", "ce", "important_loss", "unimportant_loss", "trainable_tokens", "lr"):
                assert resumed[step][key] == pytest.approx(ref_metrics[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert (interrupted / "run" / "checkpoints" / "step_4" / "COMPLETED").exists()  # saved again, whole
        if lora:
            _check_adapter_export(interrupted / "run", reference / "run", tiny_llama_dir, quantized=lora == "qlora")
            return

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


def _check_adapter_export(run: Path, reference: Path, base_dir: Path, quantized: bool = False) -> None:
    """A LoRA run's export: model/ is PEFT's adapter folder of the base (loads on it with PEFT), the same adapter as the
    uninterrupted run's, trained; model_merged/ loads with AutoModelForCausalLM and gives base + adapter's logits to
    1e-5 (QLoRA too: the adapter trained on the 4-bit base is merged into the unquantized one); the cards say which is
    which, and of which base."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = run / "model"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "config.json").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(base_dir).resolve()) and config["r"] == 4
    adapter, ref_adapter = load_file(folder / "adapter_model.safetensors"), load_file(reference / "model" / "adapter_model.safetensors")
    assert adapter.keys() == ref_adapter.keys() and all(".lora_" in key for key in adapter)
    for key in adapter:
        torch.testing.assert_close(adapter[key], ref_adapter[key], rtol=1e-4, atol=1e-5)
    assert any(v.abs().max() > 0 for k, v in adapter.items() if ".lora_B." in k)  # B starts at zero: it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), folder).eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "model_merged").eval()
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        assert (expected - AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits).abs().max() > 1e-4
        torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)
    card, merged_card = (folder / "README.md").read_text(), (run / "model_merged" / "README.md").read_text()
    assert "library_name: peft" in card and "a LoRA adapter (PEFT), not a whole model" in card and f"`{base_dir}`" in card
    assert "rank 4, alpha 8 (scale 2), dropout 0.1, on `all-linear`" in card and "PeftModel.from_pretrained" in card
    assert ("base in 4-bit NF4 while training (QLoRA)" in card) == quantized
    assert "library_name: transformers" in merged_card and "LoRA adapter merged into its weights" in merged_card


def _plain_step1_grad_norm(tiny_llama_dir, shards, micro_batches: int) -> tuple[float, float]:
    """Step 1 by hand: the trainer's first ``micro_batches`` packed micro-batches, the same loss, plain
    torch autograd accumulating over them; returns (loss, gradient norm before clipping)."""
    from data.models import load_tokenizer
    from train import config as train_config
    from train.forward import token_losses
    from train.losses import build_loss
    from train.step import Batch, group_masks
    from train.shards import ShardStream, open_annotated

    cfg = train_config.load_config(_config(Path("unused"), tiny_llama_dir, shards))
    manifest = open_annotated(cfg.data.train, tokenizer_fingerprint(load_tokenizer(cfg.model))["sha256"], "tfidf")
    batches = ShardStream(cfg.data.train, manifest, "tfidf", seed=cfg.seed, shuffle=True, epochs=1).micro_batches(cfg.data.micro_batch_tokens)
    micro = [next(batches) for _ in range(micro_batches)]
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")
    loss_fn = build_loss("sftgo", **train_config.loss_options(cfg))
    step_tokens = sum(int(b["loss_mask"].sum()) for b in micro)
    masks = group_masks([Batch.of(b) for b in micro], cfg, None)
    decisions = [{}] * len(micro)
    if cfg.loss.group_decision == "step" and micro_batches > 1:  # the worse group of the whole step, from its losses
        with torch.no_grad():
            ahead = [token_losses(model, b["input_ids"], b["position_ids"], list(b["seq_lens"]), b["loss_mask"]) for b in micro]
        decisions = [{"decision": d} for d in loss_fn.decide([m[b["loss_mask"]] for m, b in zip(masks, micro)], ahead)]
    total = 0.0
    for batch, important, decision in zip(micro, masks, decisions):
        token_loss = token_losses(model, batch["input_ids"], batch["position_ids"], list(batch["seq_lens"]), batch["loss_mask"])
        loss, _ = loss_fn(token_loss, important[batch["loss_mask"]], None, step_tokens, 0.0, **decision)
        loss.backward()
        total += loss.item()
    return total, float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))


def test_every_zero_stage_trains_the_same_steps(tmp_path, tiny_llama_dir, shards):
    """grad_accum 2: each stage's first steps (loss, pre-clip gradient norm, the losses after updates) equal
    stage 0's, and stage 0's step 1 equals plain torch accumulating the same micro-batches. (DeepSpeed 0.19's
    ZeRO-3 advances its micro-step only in engine.forward(); without the trainer doing it, ZeRO-3 overwrote
    the accumulated gradient with the last micro-batch's: this test failed then.)"""
    overrides = {"train.max_steps": 3, "checkpoint.every": 0, "eval.every": 0, "data.validation": "''"}
    runs = {}
    for stage in ("0", "1", "2", "3"):
        out = tmp_path / f"zero{stage}"
        _run(_config(out, tiny_llama_dir, shards, **overrides, **{"train.zero_stage": stage}), 1, tmp_path / f"zero{stage}.log",
             launcher="python")
        runs[stage] = _metrics(out / "run")
    loss, grad_norm = _plain_step1_grad_norm(tiny_llama_dir, shards, micro_batches=2)
    assert runs["0"][1]["loss"] == pytest.approx(loss, rel=1e-5)
    assert runs["0"][1]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    for stage in ("1", "2", "3"):
        for step in (1, 2, 3):
            for key in ("loss", "grad_norm", "trainable_tokens"):
                assert runs[stage][step][key] == pytest.approx(runs["0"][step][key], rel=1e-4), (stage, step, key)


def test_bad_input_fails_before_training(tmp_path, tiny_llama_dir, shards):
    log = tmp_path / "bad.log"
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"importance.scorer": "llmlingua2"}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "llmlingua2" in log.read_text() and "tfidf" in log.read_text()
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"loss.lambda": 1.5}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "loss.lambda" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # LoRA adapters on modules the model does not have: refused, naming the key, before any weight loads.
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"lora.rank": 4, "lora.target_modules": "q_proj,no_such_proj"}), 1,
                   log, "python")
    assert proc.wait(timeout=300) == 2
    assert "error: lora.target_modules: ['no_such_proj'] match no module of the model" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # NaN scores are found by the validation that runs before step 1 (data.deep_validate, on by default).
    fp = json.loads((shards / "train" / MANIFEST_NAME).read_text())["tokenizer"]
    examples = make_examples(8, ["tfidf"], min_len=8, max_len=20)
    examples[3]["scores"]["tfidf"][-1] = float("nan")
    write_annotated_dir(tmp_path / "nan", examples, ["tfidf"], tokenizer_fp=fp)
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **{"data.train": str(tmp_path / "nan")}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert "shard-00000.parquet: row 3: score_tfidf holds NaN" in log.read_text()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    # A path from a --config file that does not open is named with its key and that file (issue 30).
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  validation: {tmp_path / 'no_such_val'}\n")
    args = [a for a in _config(tmp_path, tiny_llama_dir, shards) if not a.startswith("data.validation=")]
    proc = _launch(["--config", str(config), *args], 1, log, "python")
    assert proc.wait(timeout=300) == 2
    assert f"data.validation (set in {config}): " in log.read_text() and "no_such_val" in log.read_text()


def test_a_refusal_after_deepspeed_starts_is_not_preceded_by_its_op_build_line(tmp_path, tiny_llama_dir, shards):
    """DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" when its process group
    starts on CPU: a refusal after that point (a ZeRO stage the DeepSpeed JSON contradicts) says only what is wrong."""
    ds_json = json.loads((REPO / "train" / "configs" / "deepspeed.json").read_text())
    ds_json["zero_optimization"]["stage"] = 3
    (tmp_path / "ds.json").write_text(json.dumps(ds_json))
    log = tmp_path / "refused.log"
    args = _config(tmp_path, tiny_llama_dir, shards, **{"deepspeed_config": str(tmp_path / "ds.json"), "train.zero_stage": 2})
    proc = _launch(args, 1, log, "python")
    assert proc.wait(timeout=300) == 2
    text = log.read_text()
    assert "error: deepspeed_config: " in text and "zero_optimization.stage is 3 but train.zero_stage resolved to 2" in text, text
    assert "built successfully" not in text, text
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("sig,code,name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_signal_stops_with_one_line_and_resumes(tmp_path, tiny_llama_dir, shards, sig, code, name):
    """Ctrl-C / SIGTERM: exit 130 / 143 within seconds, one line naming the resume point, no traceback,
    no unfinished checkpoint left; the same command then resumes from that checkpoint."""
    args = _config(tmp_path, tiny_llama_dir, shards, **{"train.max_steps": 400, "checkpoint.every": 2, "eval.every": 0})
    log = tmp_path / "first.log"
    proc = _launch(args, 1, log, launcher="python")
    marker = tmp_path / "run" / "checkpoints" / "step_4" / "COMPLETED"
    deadline = time.time() + 600
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), log.read_text()[-3000:]
    os.killpg(proc.pid, sig)  # the terminal sends Ctrl-C to the whole foreground group
    sent = time.time()
    try:
        assert proc.wait(timeout=60) == code, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.time() - sent < 30
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    step, checkpoint = [int(word) for word in lines[0].replace(";", " ").split() if word.isdigit()]
    assert lines[0] == f"interrupted ({name}) at step {step}; the same command resumes from checkpoint step {checkpoint}"
    finished = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoint == finished[-1] and checkpoint <= step and step >= 4
    assert all((tmp_path / "run" / "checkpoints" / f"step_{n}" / "COMPLETED").exists() for n in finished)
    assert not (tmp_path / "run" / "model").exists()

    # The same command resumes; a shorter max_steps is another run (it changes the lr schedule): refused, unless
    # the checkpoint is named, which continues it under the new keys and records that in the run's history.
    args = _config(tmp_path, tiny_llama_dir, shards, **{"train.max_steps": checkpoint + 2, "checkpoint.every": 2, "eval.every": 0})
    proc = _launch(args, 1, tmp_path / "changed.log", launcher="python")
    assert proc.wait(timeout=300) == 2
    assert "train.max_steps: 400 -> " in (tmp_path / "changed.log").read_text()
    resume_from = tmp_path / "run" / "checkpoints" / f"step_{checkpoint}"
    _run([*args, f"checkpoint.resume={resume_from}"], 1, tmp_path / "resume.log", launcher="python")
    assert f"at step {checkpoint}" in (tmp_path / "resume.log").read_text()
    assert sorted(_metrics(tmp_path / "run"))[-1] == checkpoint + 2
    history = json.loads((tmp_path / "run" / "train_summary.json").read_text())["history"]
    assert history[0]["start"] == "fresh" and history[-1]["start"] == f"resumed from {resume_from}"
    assert any(key.startswith("train.max_steps: 400 -> ") for key in history[-1]["changed_keys"])


def test_eval_keys_group_the_validation_data_by_their_own_score(tmp_path, tiny_llama_dir, shards):
    """eval.scorer / eval.rho / eval.scope: held-out groups by another score than training's (here base_loss
    at the train manifest's corpus cut), equal to train.heldout on the unchanged (lr 0) model."""
    from evaluation.run import load_model
    from train.grouping import manifest_corpus_cut
    from train.heldout import heldout_losses
    from train.shards import open_annotated

    args = _config(tmp_path, tiny_llama_dir, shards, **{"optim.lr": 0.0, "train.max_steps": 1, "eval.every": 1,
                                                        "eval.max_batches": 0, "checkpoint.every": 0, "eval.scorer": "base_loss",
                                                        "eval.rho": 0.5, "eval.scope": "corpus"})
    _run(args, 1, tmp_path / "train.log", launcher="python")
    assert "evaluation groups: base_loss at rho 0.5 (corpus scope)" in (tmp_path / "train.log").read_text()
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_ce" in line]
    val = str(shards / "val")
    cut = manifest_corpus_cut(open_annotated(str(shards / "train"), None, "base_loss"), "base_loss", 0.5)
    ours = heldout_losses(load_model(str(tiny_llama_dir), torch.device("cpu")), val, open_annotated(val, None, "base_loss"),
                          "base_loss", 0.5, "corpus", cut, micro_batch_tokens=96, progress=False)
    assert 0 < ours["important_tokens"] < ours["tokens"]
    for record in logged:  # the step-1 evaluation and the final one
        assert record["eval_tokens"] == ours["tokens"]
        for key in ("important_loss", "unimportant_loss", "accuracy", "important_accuracy", "unimportant_accuracy"):
            assert record[f"eval_{key}"] == pytest.approx(ours[key], rel=1e-5, abs=1e-9)


def test_lr_zero_negative_control_exports_the_base_model_exactly(tmp_path, tiny_llama_dir, shards):
    """Training at lr 0 must change nothing: the exported folder's logits equal the base model's bit for
    bit and its greedy generations (through its own saved tokenizer and chat template) are the same."""
    from evaluation.run import generate_answers, load_model
    from data.models import load_tokenizer

    args = _config(tmp_path, tiny_llama_dir, shards, **{"optim.lr": 0.0, "train.max_steps": 3, "eval.every": 1})
    _run(args, 1, tmp_path / "train.log", launcher="python")
    exported, base = tmp_path / "run" / "model", tiny_llama_dir
    metrics = _metrics(tmp_path / "run")
    assert sorted(metrics) == [1, 2, 3] and all(r["lr"] == 0.0 for r in metrics.values())
    # One held-out stream, rewound for each evaluation: the same batches every time, so equal numbers.
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "eval_ce" in line]
    assert len(evals) == 4 and evals[0]["eval_tokens"] > 0
    assert all((e["eval_ce"], e["eval_tokens"]) == (evals[0]["eval_ce"], evals[0]["eval_tokens"]) for e in evals)
    trained_model, base_model = load_model(str(exported), torch.device("cpu")), load_model(str(base), torch.device("cpu"))
    ids = torch.randint(0, base_model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(trained_model(input_ids=ids).logits, base_model(input_ids=ids).logits)
    prompts = ["What is the capital of France?", "Write a haiku about autumn."]
    trained_tok, base_tok = load_tokenizer(str(exported)), load_tokenizer(str(base))
    assert trained_tok.chat_template == base_tok.chat_template
    assert (generate_answers(trained_model, trained_tok, prompts, 8, torch.device("cpu"))
            == generate_answers(base_model, base_tok, prompts, 8, torch.device("cpu")))


def test_finished_run_is_not_redone_and_keep_final_false_leaves_only_the_model(tmp_path, tiny_llama_dir, shards):
    args = _config(tmp_path, tiny_llama_dir, shards, **{"train.max_steps": 2, "checkpoint.every": 1, "checkpoint.keep": 1,
                                                        "checkpoint.keep_final": "false", "eval.every": 0})
    _run(args, 1, tmp_path / "first.log", launcher="python")
    first = (tmp_path / "first.log").read_text()
    assert "checkpoint step 1: " in first and "GiB in" in first and "(1 kept," in first
    assert "checkpoint.keep_final=false: deleted" in first
    run = tmp_path / "run"
    assert not (run / "checkpoints").exists() and (run / "model" / "model.safetensors").is_file()
    metrics = (run / "metrics.jsonl").read_text()
    _check_model_card(run / "model", shards / "train", json.loads(metrics.splitlines()[-1]))
    _run(args, 1, tmp_path / "again.log", launcher="python")  # the same command: nothing to redo
    assert "already trained with this config (2 steps)" in (tmp_path / "again.log").read_text()
    assert (run / "metrics.jsonl").read_text() == metrics


def _check_model_card(folder: Path, train_dir: Path, final_eval: dict) -> None:
    """The exported folder says what made it (README.md, Hub format) and how to generate (generation_config.json),
    and still loads with the Auto classes."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from schemas.shard import manifest_sha256

    card = ModelCard.load(folder / "README.md")
    assert card.data.to_dict()["library_name"] == "transformers"
    assert card.data.to_dict()["tags"] == ["sftgo", "loss-sftgo", "score-tfidf"]
    assert "base_model" not in card.data.to_dict()  # a local folder has no Hub id
    assert "| objective | sftgo: (1 − λ)·CE + λ·(worse group's mean loss), λ = 0.9 (static) |" in card.text
    assert "`tfidf`, rho 0.7 (the top 30% of trainable tokens by score are important), scope `sequence`" in card.text
    assert f"manifest sha256 `{manifest_sha256(train_dir)}`" in card.text
    assert "| steps | 2 of 2 |" in card.text
    assert f"| final held-out CE | {final_eval['eval_ce']:.4f} over {int(final_eval['eval_tokens']):,} tokens |" in card.text
    assert "optim:" in card.text and "lr: 0.001" in card.text  # the full config, as saved beside the run
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generation = GenerationConfig.from_pretrained(folder)
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else [generation.eos_token_id]
    assert tokenizer.eos_token_id in eos and generation.pad_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf Records)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position = run_file.read_bytes(), 32768, 7  # after the ":W&B" header
    payloads, pending = [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:  # full
            payloads.append(chunk)
        elif kind in (2, 3):  # first, middle
            pending = (pending if kind == 3 else b"") + chunk
        elif kind == 4:  # last
            payloads.append(pending + chunk)
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def test_report_to_wandb_logs_the_metrics_jsonl_keys(tmp_path, tiny_llama_dir, shards):
    args = _config(tmp_path, tiny_llama_dir, shards, **{"train.max_steps": 2, "checkpoint.every": 0, "eval.every": 2,
                                                        "report_to": "jsonl,wandb"})
    _run(args, 1, tmp_path / "train.log", launcher="python", env=_env(WANDB_MODE="offline", WANDB_PROJECT="sftgo-test"))
    run = tmp_path / "run"
    expected = [{k: v for k, v in json.loads(line).items() if isinstance(v, (int, float))}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    run_files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    assert run_files[0].name == f"run-{(run / 'wandb_run_id').read_text().strip()}.wandb"
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in _wandb_history(run_files[0])]
    assert logged == expected and [row["step"] for row in logged][:2] == [1, 2] and "eval_ce" in logged[-1]


# ---------------------------------------------------------------------------------------------
# Exactly what the config says: epochs, max_steps, the logged lr, --dry-run, one run per directory
# ---------------------------------------------------------------------------------------------


def _dry_run_steps(args, ranks: int) -> tuple[int, str]:
    env = _env(WORLD_SIZE=str(ranks))
    proc = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *args, "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("steps: "))
    return int(line.split()[1]), proc.stdout


@pytest.mark.parametrize("ranks,grad_accum,epochs", [(1, 3, 2), (2, 1, 1), (2, 3, 2)])
def test_epochs_train_every_example_exactly_once_each(tmp_path, tiny_llama_dir, shards, ranks, grad_accum, epochs):
    """train.epochs=E: every example E times, the trainable tokens add up exactly (recorded per epoch in
    train_summary.json), the steps are the dry run's, and a run stopped mid-way and resumed keeps all of it."""
    train_tokens = json.loads((shards / "train" / MANIFEST_NAME).read_text())["totals"]["trainable_tokens"]
    args = _config(tmp_path, tiny_llama_dir, shards, **{
        "train.max_steps": 0, "train.epochs": epochs, "train.grad_accum": grad_accum, "data.micro_batch_tokens": 64,
        "checkpoint.every": 2, "eval.every": 0, "data.validation": "''"})
    planned, text = _dry_run_steps(args, ranks)
    assert "nothing is loaded or trained" in text and "objective: " in text and "zero stage" in text
    assert "data: 48 examples, " in text and f" tokens, {train_tokens} trainable tokens per epoch" in text
    try:
        if ranks == 1:  # stopped after the step-2 checkpoint, then the same command resumes
            proc = _launch(args, 1, tmp_path / "first.log", launcher="python")
            marker = tmp_path / "run" / "checkpoints" / "step_2" / "COMPLETED"
            deadline = time.time() + 600
            while not marker.exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=120) in (0, 143)
        _run(args, ranks, tmp_path / "train.log", launcher="python" if ranks == 1 else "deepspeed")
    finally:
        _cleanup_shm()
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == planned
    assert summary["epochs_trained"] == [{"epoch": e, "examples": 48, "trainable_tokens": train_tokens} for e in range(epochs)]
    metrics = _metrics(tmp_path / "run")
    assert sorted(metrics) == list(range(1, planned + 1))
    assert sum(r["trainable_tokens"] for r in metrics.values()) == epochs * train_tokens
    assert f"steps: {planned} for {epochs} epoch(s)" in (tmp_path / "train.log").read_text()


def test_max_steps_trains_exactly_that_many_steps_and_logs_each_steps_lr(tmp_path, tiny_llama_dir, shards):
    """max_steps=N overrides epochs (here 1 epoch holds fewer steps: the data cycles); the logged lr is the rate the
    step used (warmup 1, cosine from 1e-3: step 1 at 5e-4, the last step above 0)."""
    from train.config import OptimConfig
    from train.schedule import lr_at

    args = _config(tmp_path, tiny_llama_dir, shards, **{"train.max_steps": 9, "train.epochs": 1, "train.grad_accum": 2,
                                                        "data.micro_batch_tokens": 512, "checkpoint.every": 0, "eval.every": 0})
    _run(args, 1, tmp_path / "train.log", launcher="python")
    text = (tmp_path / "train.log").read_text()
    assert "train.max_steps=9 overrides train.epochs=1: exactly 9 steps" in text
    metrics = _metrics(tmp_path / "run")
    assert sorted(metrics) == list(range(1, 10)) and max(r["epoch"] for r in metrics.values()) >= 1
    optim = OptimConfig(lr=1e-3, warmup_steps=1)
    assert [metrics[s]["lr"] for s in range(1, 10)] == pytest.approx([1e-3 * lr_at(s - 1, 9, optim) for s in range(1, 10)])
    assert metrics[1]["lr"] == pytest.approx(5e-4) and metrics[9]["lr"] > 0


def test_a_run_directory_holds_one_run(tmp_path, tiny_llama_dir, shards):
    """Another loss (or lr) in the same output_dir is refused before any model loads, naming the keys, whether the
    old run kept its checkpoint or not; a refused or fresh start never appends to an old metrics.jsonl."""
    base = {"train.max_steps": 1, "checkpoint.every": 0, "eval.every": 0, "data.validation": "''"}
    _run(_config(tmp_path, tiny_llama_dir, shards, **base, **{"loss.name": "sft"}), 1, tmp_path / "sft.log", launcher="python")
    weights = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    log = tmp_path / "sftgo.log"
    proc = _launch(_config(tmp_path, tiny_llama_dir, shards, **base, **{"loss.name": "sftgo"}), 1, log, "python")
    assert proc.wait(timeout=300) == 2
    text = log.read_text()
    assert "loss.name: 'sft' -> 'sftgo'" in text and "use another output_dir" in text and "Loading weights" not in text
    assert (tmp_path / "run" / "model" / "model.safetensors").read_bytes() == weights
    assert "name: sft\n" in (tmp_path / "run" / "config.yaml").read_text()

    # No checkpoint left (keep_final: false): the finished run's summary is the record.
    other = tmp_path / "other"
    no_final = {**base, "checkpoint.keep_final": "false"}
    _run(_config(other, tiny_llama_dir, shards, **no_final), 1, tmp_path / "first.log", launcher="python")
    metrics = (other / "run" / "metrics.jsonl").read_text()
    proc = _launch(_config(other, tiny_llama_dir, shards, **no_final, **{"optim.lr": 5e-4}), 1, log, "python")
    assert proc.wait(timeout=300) == 2 and "optim.lr: 0.001 -> 0.0005" in log.read_text()
    assert (other / "run" / "metrics.jsonl").read_text() == metrics
    # checkpoint.resume=never trains the new config from scratch in its place: a fresh metrics.jsonl.
    _run(_config(other, tiny_llama_dir, shards, **no_final, **{"optim.lr": 5e-4, "checkpoint.resume": "never"}), 1,
         tmp_path / "again.log", launcher="python")
    assert [json.loads(line)["step"] for line in (other / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    assert "lr: 0.0005" in (other / "run" / "model" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Per-source losses in a real run
# ---------------------------------------------------------------------------------------------


def test_per_source_losses_in_metrics_jsonl_tensorboard_and_summary(tmp_path, tiny_llama_dir, smol_tokenizer):
    """Two sources (one name unsafe as a metric key): every train.log_every=2 steps (and the last) the step record has
    each source's CE, group losses and tokens over the window, which add up to the steps' own CE and tokens; every
    evaluation the held-out ones, adding up to eval_ce / eval_tokens; the same keys in TensorBoard; the summary maps
    keys to names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fp = dict(tokenizer_fingerprint(smol_tokenizer), name="tiny")
    names = ("lima", "web/alpaca en.json")
    for split, n, seed in (("train", 24, 0), ("val", 10, 1)):
        examples = make_examples(n, ["tfidf"], seed=seed, min_len=8, max_len=40, prefix=split)
        for i, ex in enumerate(examples):
            ex["source"] = names[i % 3 == 0]
        write_annotated_dir(tmp_path / "shards" / split, examples, ["tfidf"], tokenizer_fp=fp, rows_per_shard=8)
    args = _config(tmp_path, tiny_llama_dir, tmp_path / "shards", **{
        "data.train": str(tmp_path / "shards" / "train"), "data.validation": str(tmp_path / "shards" / "val"),
        "train.max_steps": 5, "train.log_every": 2, "checkpoint.every": 0, "eval.every": 2, "eval.max_batches": 0})
    dry = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *args, "--dry-run"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300).stdout
    assert f"per-source metrics: 2 source(s) in {tmp_path / 'shards' / 'train'}: lima, web_alpaca_en.json" in dry
    _run(args, 1, tmp_path / "train.log", launcher="python")
    log = (tmp_path / "train.log").read_text()
    assert "per-source metrics: 2 source(s) in " in log and "lima, web_alpaca_en.json ('web/alpaca en.json')" in log
    assert "final eval, source lima: tokens=" in log and "final eval, source web_alpaca_en.json: tokens=" in log
    run = tmp_path / "run"
    steps = _metrics(run)
    keys = ("lima", "web_alpaca_en.json")
    for window in ((1, 2), (3, 4), (5,)):  # log_every 2, and the last step
        logged = steps[window[-1]]
        assert all(not any(k.startswith("source/") for k in steps[s]) for s in window[:-1])
        tokens = [logged[f"source/{key}/tokens"] for key in keys]
        assert all(t > 0 for t in tokens) and sum(tokens) == sum(steps[s]["trainable_tokens"] for s in window)
        ce_sum = sum(logged[f"source/{key}/ce"] * t for key, t in zip(keys, tokens))
        assert ce_sum == pytest.approx(sum(steps[s]["ce"] * steps[s]["trainable_tokens"] for s in window), rel=1e-5)
        for key in keys:
            assert set(k for k in logged if k.startswith(f"source/{key}/")) == {
                f"source/{key}/{name}" for name in ("tokens", "ce", "important_loss", "unimportant_loss")}
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_ce" in line]
    assert [e["step"] for e in evals] == [2, 4, 5]  # eval.every 2, then the final evaluation
    for record in evals:
        tokens = [record[f"eval_source/{key}/tokens"] for key in keys]
        assert all(t > 0 for t in tokens) and sum(tokens) == record["eval_tokens"]
        assert sum(record[f"eval_source/{key}/ce"] * t for key, t in zip(keys, tokens)) == pytest.approx(
            record["eval_ce"] * record["eval_tokens"], rel=1e-9)
        assert all(f"eval_source/{key}/{name}" in record for key in keys for name in ("accuracy", "important_loss", "unimportant_loss"))
    events = EventAccumulator(str(next((run / "tensorboard").glob("events.out.tfevents.*")))).Reload()
    assert [e.step for e in events.Scalars("source/web_alpaca_en.json/ce")] == [2, 4, 5]
    assert events.Scalars("eval_source/lima/ce")[0].value == pytest.approx(evals[0]["eval_source/lima/ce"], rel=1e-6)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["sources"] == {"train": dict(zip(keys, names)), "validation": dict(zip(keys, names))}
