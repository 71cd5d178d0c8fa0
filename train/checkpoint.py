"""A run directory's state on disk: checkpoints (save, prune, resume), what was trained, and the summary.

    out/checkpoints/step_<N>/   DeepSpeed's files (model, optimizer, scheduler; LoRA: the adapters only, the frozen
                                base is read again from ``model`` on resume), then ours, all JSON:
        data_rank<r>.json       the stream's position (train.shards.ShardStream.state_dict)
        rng_rank<r>.json        Python, NumPy, torch and CUDA RNG states (never a pickle)
        trained_rank<r>.json    examples and trainable tokens trained per epoch on rank r
        trainer_state.json      step, ZeRO stage, world size, total steps, the run's identity
        COMPLETED               written last: a checkpoint counts only once it exists
    out/train_summary.json      what a finished run trained (also read to tell a rerun it is already done)
    out/run_history.jsonl       one line per start: fresh, or resumed from which checkpoint under which changes

A run's *identity* is every config key that decides the weights (:func:`train.config.weight_keys`) plus
the training data's fingerprint; a checkpoint or finished run of another identity is not continued silently.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from schemas.shard import atomic_write_text
from train import config as train_config
from train.config import TrainConfig
from train.metrics import log0
from train.shards import STATE_VERSION as STREAM_STATE_VERSION
from train.shards import ShardStream, StreamPlan

COMPLETED = "COMPLETED"  # a checkpoint counts only once this marker is written after it
TRAINER_STATE = "trainer_state.json"  # step, ZeRO stage and world size of a checkpoint
SUMMARY = "train_summary.json"


class Refusal(Exception):
    """A run that must not go on: main() logs the message, leaves the process group and exits 2."""


@contextlib.contextmanager
def refusing(*errors: type[Exception]) -> Iterator[None]:
    """Turn ``errors`` raised in the block into a :class:`Refusal` with the same message."""
    try:
        yield
    except errors as exc:
        raise Refusal(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint to resume, and whether it may be resumed
# ---------------------------------------------------------------------------------------------


def completed_checkpoints(root: Path) -> list[Path]:
    """The completed checkpoints under ``root``, oldest first."""
    done = [p for p in root.glob("step_*") if (p / COMPLETED).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def resume_path(cfg: TrainConfig, root: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume not in ("auto", ""):
        path = Path(cfg.checkpoint.resume)
        if not (path / COMPLETED).exists():
            raise FileNotFoundError(f"checkpoint.resume={path}: not a completed checkpoint (no {COMPLETED} marker)")
        return path
    found = completed_checkpoints(root)
    return found[-1] if found else None


def run_identity(cfg: TrainConfig, manifests: list[Any]) -> tuple[str, dict[str, Any]]:
    """The run's config fingerprint (a rerun of it finds the finished run) and identity (what decides the weights).

    The config and what the data holds for this run (rows, tokens, tokenizer, the chosen score's
    statistics): columns added later by --add-scorers (ref_loss) do not make a finished run stale."""
    data_key = [{"totals": m.totals, "tokenizer": m.tokenizer.get("sha256"), "score": m.score_stats.get(cfg.importance.scorer)}
                for m in manifests if m is not None]
    config_sha256 = hashlib.sha256((train_config.format_config(cfg) + json.dumps(data_key, sort_keys=True, default=str)).encode()).hexdigest()
    identity = {**train_config.weight_keys(cfg),
                "data.train (contents)": hashlib.sha256(json.dumps(data_key[0], sort_keys=True, default=str).encode()).hexdigest()}
    return config_sha256, identity


def finished_run(out: Path, config_sha256: str) -> dict[str, Any] | None:
    """train_summary.json of a run that finished (model exported) with exactly this config, else None."""
    from train.lora import ADAPTER_CONFIG

    summary = out / SUMMARY
    if not summary.is_file() or not any((out / "model" / name).is_file() for name in ("config.json", ADAPTER_CONFIG)):
        return None
    try:
        done = json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return done if isinstance(done, dict) and done.get("config_sha256") == config_sha256 else None


def run_mismatch(recorded: dict[str, Any] | None, identity: dict[str, Any], what: str, out: Path) -> str | None:
    """The refusal when ``what`` (a checkpoint or finished run in ``out``) was trained under other weight-deciding
    keys than ``identity`` (:func:`train.config.weight_keys` plus the training data's fingerprint), else None."""
    if recorded == identity:
        return None
    if recorded is None:
        differ = "its keys were not recorded (an older sftgo)"
    else:
        differ = "keys that differ: " + "; ".join(train_config.changed_keys(recorded, identity))
    return (f"{out} holds {what} trained under another config ({differ}). A run directory holds one run: use another "
            f"output_dir, or checkpoint.resume=PATH (a checkpoint under {out / 'checkpoints'}) to continue it under the "
            f"new keys (recorded in the run's history), or checkpoint.resume=never to train this config from scratch "
            f"in its place")


def start_point(cfg: TrainConfig, out: Path, identity: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
    """The checkpoint to resume (None: a fresh start) and the run-history entry saying so. Refuses (:class:`Refusal`)
    a checkpoint or finished run of another identity, unless ``checkpoint.resume`` names the checkpoint explicitly."""
    explicit_resume = cfg.checkpoint.resume not in ("auto", "never", "")
    resume = resume_path(cfg, out / "checkpoints")
    history: dict[str, Any] = {"start": "fresh"}
    if resume is not None:  # before any model loads: a checkpoint of another run, stage or world cannot resume
        recorded = json.loads((resume / TRAINER_STATE).read_text()).get("identity") if (resume / TRAINER_STATE).is_file() else None
        mismatch = run_mismatch(recorded, identity, f"checkpoint {resume.name}", out)
        if mismatch is not None and not explicit_resume:
            raise Refusal(mismatch)
        history = {"start": f"resumed from {resume}"}
        if mismatch is not None:
            history["changed_keys"] = train_config.changed_keys(recorded or {}, identity)
    elif cfg.checkpoint.resume != "never" and (out / SUMMARY).is_file():
        # A finished run whose checkpoints are gone (keep_final: false): its model and card must not be overwritten
        # by another config's run unnoticed.
        recorded = json.loads((out / SUMMARY).read_text()).get("identity")
        mismatch = run_mismatch(recorded, identity, "a finished run", out)
        if mismatch is not None:
            raise Refusal(mismatch)
    return resume, history


def start_run_dir(cfg: TrainConfig, out: Path, history: dict[str, Any]) -> None:
    """Create ``out`` and write the resolved config there (rank 0); log it, and the keys a resume continues under."""
    out.mkdir(parents=True, exist_ok=True)
    train_config.save_config(cfg, out / "config.yaml")
    log0("== train config ==\n" + train_config.format_config(cfg))
    if "changed_keys" in history:
        log0(f"checkpoint.resume={cfg.checkpoint.resume}: continuing under changed keys: " + "; ".join(history["changed_keys"]))


def record_start(out: Path, step: int, history: dict[str, Any]) -> None:
    """Append this start to ``out/run_history.jsonl`` (rank 0)."""
    with open(out / "run_history.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step, **history}) + "\n")


def _adapter_shape(rank: int, targets: Any) -> str:
    return f"LoRA adapters of rank {rank} on {list(targets)}" if rank else "full weights (no LoRA)"


def check_resumable(path: Path, zero_stage: int, world_size: int, lora: Any = None) -> None:
    """Refuse (ValueError) a checkpoint written at another ZeRO stage or world size: DeepSpeed's
    files differ by stage and its optimizer shards by rank count; or, with ``lora`` (the run's ``lora`` section),
    one of other trained weights: full weights against adapters, or adapters of another rank or other modules."""
    if not (path / "rng_rank0.json").exists() or not (path / TRAINER_STATE).exists():
        raise ValueError(f"checkpoint {path} was written by an older sftgo (its RNG state is a pickle, which is no "
                         f"longer loaded); set checkpoint.resume=never to start over")
    data_state = json.loads((path / "data_rank0.json").read_text())
    if data_state.get("version") != STREAM_STATE_VERSION:
        raise ValueError(f"checkpoint {path} was written by an older sftgo (data position version {data_state.get('version')}: "
                         f"ranks split by example count, not by tokens); it cannot continue this order exactly: "
                         f"set checkpoint.resume=never to start over")
    state_file = path / TRAINER_STATE
    state = json.loads(state_file.read_text())
    saved_stage, saved_world = state.get("zero_stage"), state.get("world_size", world_size)
    if saved_stage != zero_stage or saved_world != world_size:
        raise ValueError(f"checkpoint {path} was written at ZeRO stage {saved_stage} on {saved_world} rank(s); this run "
                         f"is stage {zero_stage} on {world_size}: set train.zero_stage={saved_stage} and the same ranks "
                         f"to resume it, or checkpoint.resume=never to start over")
    if lora is not None:
        recorded = state.get("identity") or {}
        saved = _adapter_shape(recorded.get("lora.rank", 0), recorded.get("lora.target_modules", []))
        wanted = _adapter_shape(lora.rank, lora.target_modules)
        if saved != wanted:
            raise ValueError(f"checkpoint {path} holds {saved}; this run trains {wanted} (lora.rank, lora.target_modules): "
                             f"set them as the checkpoint's run did to resume it, or checkpoint.resume=never to start over")


# ---------------------------------------------------------------------------------------------
# RNG state as JSON
# ---------------------------------------------------------------------------------------------


def _encode_tensor(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def seed_all(seed: int) -> None:
    """Seed torch, Python and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain JSON: nothing executable in a checkpoint of ours."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(mt), gauss], "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": _encode_tensor(torch.get_rng_state()),
            "cuda": [_encode_tensor(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_decode_tensor(state["torch"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_decode_tensor(s) for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# Save, prune, load
# ---------------------------------------------------------------------------------------------


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def save_checkpoint(engine: Any, stream: ShardStream, root: Path, step: int, rank: int, keep: int, extra: dict[str, Any],
                    trained: dict[int, list[int]]) -> Path:
    """Model, optimizer, scheduler (DeepSpeed's files; with LoRA adapters the frozen base is left out), plus our own
    state as JSON (never pickled): per-rank data position, RNG and examples / tokens trained per epoch, and
    trainer_state.json (step, ZeRO stage, world size, ``extra``); COMPLETED last."""
    from train.lora import peft_model_of

    tag = f"step_{step}"
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=peft_model_of(engine.module) is not None)
    atomic_write_text(path / f"data_rank{rank}.json", json.dumps(stream.state_dict()))
    atomic_write_text(path / f"trained_rank{rank}.json", json.dumps(trained))
    atomic_write_text(path / f"rng_rank{rank}.json", json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        state = {"step": step, "zero_stage": engine.zero_optimization_stage(), "world_size": dist.get_world_size(), **extra}
        atomic_write_text(path / TRAINER_STATE, json.dumps(state))
        atomic_write_text(path / COMPLETED, json.dumps({"step": step}))
        for old in completed_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        kept = completed_checkpoints(root)
        log0(f"checkpoint step {step}: {gib(folder_bytes(path))} in {path} ({len(kept)} kept, "
             f"{gib(sum(folder_bytes(k) for k in kept))} in all; checkpoint.keep={keep})")
    dist.barrier()
    return path


def load_checkpoint(engine: Any, stream: ShardStream, path: Path, rank: int) -> int:
    """Restore what :func:`save_checkpoint` wrote (engine, data position, RNG); returns the step. With LoRA adapters
    the checkpoint holds no frozen weight: the base loaded from ``model`` keeps its own (non-strict module load)."""
    from train.lora import peft_model_of

    # DeepSpeed's own files: pickles (README: trust them).
    engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=peft_model_of(engine.module) is None)
    stream.load_state_dict(json.loads((path / f"data_rank{rank}.json").read_text()))
    set_rng_state(json.loads((path / f"rng_rank{rank}.json").read_text()))
    return int(json.loads((path / TRAINER_STATE).read_text())["step"])


def discard_unfinished(root: Path, rank: int) -> list[Path]:
    """Remove checkpoint folders cut off mid-write (no COMPLETED; rank 0); return the completed ones."""
    for partial in root.glob("step_*"):
        if not (partial / COMPLETED).exists() and rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
    return completed_checkpoints(root)


# ---------------------------------------------------------------------------------------------
# Interrupted: where the same command resumes
# ---------------------------------------------------------------------------------------------


class Terminated(Exception):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


@dataclass
class Progress:
    """Where the run is, for the one line printed when it is interrupted."""

    step: int = 0
    ckpt_root: Path | None = None
    rank: int = 0


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated`, SIGINT KeyboardInterrupt, inside the block (the old handlers after it).

    Ctrl-C's KeyboardInterrupt even when started from a script's background `&`, which leaves SIGINT
    ignored (Python then keeps it ignored): `kill -INT` must stop a run as it stops annotate."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def interrupted(exc: BaseException, progress: Progress) -> int:
    """After Ctrl-C (exit 130) or SIGTERM (exit 143): one line saying where the same command resumes, unfinished
    checkpoint folders removed, the process group left; returns the exit code."""
    code, name = (143, "SIGTERM") if isinstance(exc, Terminated) else (130, "Ctrl-C")
    # Ignore a second signal while cleaning up: the line below must be printed whole.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    done = discard_unfinished(progress.ckpt_root, progress.rank) if progress.ckpt_root is not None else []
    where = f"from checkpoint step {done[-1].name.split('_')[1]}" if done else "from step 0 (no checkpoint was finished)"
    if progress.rank == 0:
        print(f"\ninterrupted ({name}) at step {progress.step}; the same command resumes {where}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


# ---------------------------------------------------------------------------------------------
# What was trained, per epoch
# ---------------------------------------------------------------------------------------------


def load_trained_counts(path: Path, rank: int) -> dict[int, list[int]]:
    """This rank's examples and trainable tokens trained per epoch, as :func:`save_checkpoint` wrote them."""
    return {int(epoch): list(counts) for epoch, counts in json.loads((path / f"trained_rank{rank}.json").read_text()).items()}


def count_trained(trained: dict[int, list[int]], micro: list[Any]) -> None:
    """Add a step's micro-batches (``train.step.Batch``) to ``trained``: per epoch, [examples, trainable tokens] on this rank."""
    for batch in micro:
        if not batch.empty:
            counts = trained.setdefault(int(batch.epoch), [0, 0])
            counts[0] += len(batch.ids)
            counts[1] += int(batch.loss_mask.sum())


def gather_trained(trained: dict[int, list[int]], device: torch.device) -> list[dict[str, int]]:
    """Per epoch, examples and trainable tokens trained on all ranks (summed)."""
    epochs = torch.tensor([max(trained, default=-1) + 1], device=device)
    dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
    table = torch.zeros(int(epochs.item()), 2, dtype=torch.int64, device=device)
    for epoch, (examples, tokens) in trained.items():
        table[epoch] = torch.tensor([examples, tokens])
    dist.all_reduce(table)
    return [{"epoch": e, "examples": int(row[0]), "trainable_tokens": int(row[1])} for e, row in enumerate(table.tolist())]


def epoch_problems(per_epoch: list[dict[str, int]], plan: StreamPlan, epochs: int) -> list[str]:
    """How what was trained differs from ``epochs`` x every example once (empty when it does not)."""
    problems = []
    if len(per_epoch) != epochs:
        problems.append(f"trained {len(per_epoch)} epoch(s), configured {epochs}")
    for row in per_epoch:
        if (row["examples"], row["trainable_tokens"]) != (plan.examples, plan.trainable_tokens):
            problems.append(f"epoch {row['epoch']}: {row['examples']} examples / {row['trainable_tokens']} trainable tokens, "
                            f"the data holds {plan.examples} / {plan.trainable_tokens}")
    return problems


def refuse_short_epochs(per_epoch: list[dict[str, int]], plan: StreamPlan, cfg: TrainConfig, out: Path, rank: int,
                        steps: int, total_steps: int) -> None:
    """Raise :class:`Refusal` (nothing is exported; rank 0 writes a summary that says why) when what was trained is
    not ``train.epochs`` x every example once. ``train.max_steps`` runs count steps, not epochs: never refused."""
    problems = [] if cfg.train.max_steps else epoch_problems(per_epoch, plan, cfg.train.epochs)
    if problems:
        if rank == 0:
            write_summary(out, {"steps": steps, "total_steps": total_steps, "epochs_trained": per_epoch, "error": problems})
        raise Refusal("what was trained is not train.epochs x every example once: " + "; ".join(problems))


def finish_run_dir(cfg: TrainConfig, out: Path, steps: int) -> None:
    """Rank 0, after the export: delete the checkpoints unless ``checkpoint.keep_final``, and say where the run is."""
    if not cfg.checkpoint.keep_final:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        log0(f"checkpoint.keep_final=false: deleted {out / 'checkpoints'}")
    log0(f"done: {steps} steps; model in {out / 'model'} ({gib(folder_bytes(out / 'model'))}), metrics in {out / 'metrics.jsonl'}")


def run_history(out: Path) -> list[dict[str, Any]]:
    """The entries of ``out/run_history.jsonl`` (:func:`record_start`), oldest first."""
    lines = (out / "run_history.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def run_summary(cfg: TrainConfig, out: Path, steps: int, total_steps: int, per_epoch: list[dict[str, int]], plan: StreamPlan,
                share: dict[str, Any], skipped: int, sources: list[str], validation_sources: list[str] | None,
                config_sha256: str, identity: dict[str, Any]) -> dict[str, Any]:
    """``train_summary.json`` of a finished run: steps, epochs and what each trained, the data per epoch, the groups'
    realised share, the sources (metric key -> value, for the report), the config's fingerprint and identity, the history."""
    from train.sources import source_keys

    return {
        "steps": steps, "total_steps": total_steps, "max_steps": cfg.train.max_steps or None,
        "epochs": None if cfg.train.max_steps else cfg.train.epochs, "epochs_trained": per_epoch,
        "data_per_epoch": {"examples": plan.examples, "trainable_tokens": plan.trainable_tokens, "skipped_no_trainable": plan.skipped},
        "important_share": {key: share[key] for key in ("share", "target", "differs", "scope", "method")},
        "skipped_no_trainable": skipped,
        # Metric key -> source value, for the report (keys are the values made safe: train/sources.py).
        "sources": {"train": dict(zip(source_keys(sources), sources)),
                    "validation": dict(zip(source_keys(validation_sources), validation_sources)) if validation_sources is not None else {}},
        "config_sha256": config_sha256, "identity": identity, "history": run_history(out)}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/train_summary.json`` (rank 0), atomically."""
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))
