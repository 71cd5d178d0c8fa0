"""Train on annotated shards with SFT-GO, Rho-1, InfoSFT, DFT or SFT under DeepSpeed ZeRO-3.

    deepspeed train/main.py --config train/configs/lima_sftgo.yaml                 # 1..N GPUs
    deepspeed --hostfile docker/hostfile train/main.py --config ...                  # several nodes
    python train/main.py --config train/configs/demo_cpu.yaml loss.name=sftgo importance.rho=0.7

One explicit loop, top to bottom: setup (config, distributed, data, model, engine) -> train (steps of
``grad_accum`` packed micro-batches; checkpoint and evaluate every N steps) -> save (export a Hugging
Face folder). Token groups are computed here, at load time, from the stored score and rho.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

# Runnable as a script (python train/main.py, deepspeed train/main.py) without installing the repo. The
# script's own folder leaves sys.path: its modules (inspect.py, evaluate.py, config.py) would
# otherwise shadow the standard library's and other packages' modules of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from schemas.shard import atomic_write_text, manifest_sha256  # noqa: E402
from train import config as train_config  # noqa: E402
from train.card import model_card  # noqa: E402
from train.config import TrainConfig  # noqa: E402
# The ZeRO plan lives in train/engine.py; these names stay importable from here.
from train.engine import (STATE_BYTES_PER_PARAM, STATE_FRACTION, ZeroPlan, choose_zero_stage,  # noqa: E402,F401
                                count_parameters, device_memory_bytes, resolve_zero_stage)
from train.forward import resolve_attn_implementation, token_losses  # noqa: E402
from data.shard_stats import important_share_warning, realised_important_share  # noqa: E402
from train.grouping import CorpusCut, manifest_corpus_cut, step_important_masks  # noqa: E402
from train.losses import build_loss  # noqa: E402
from train.mfu import ModelFlops, StepTimer, device_peak_flops, mfu  # noqa: E402
from train.schedule import make_scheduler  # noqa: E402
from train.shards import STATE_VERSION as STREAM_STATE_VERSION  # noqa: E402
from train.shards import ShardStream, StreamPlan, open_annotated  # noqa: E402

# DeepSpeed's ZeRO stages call this every step (3 warnings a step); nothing a user of this trainer can change.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", category=FutureWarning)

COMPLETED = "COMPLETED"  # a checkpoint counts only once this marker is written after it
TRAINER_STATE = "trainer_state.json"  # step, ZeRO stage and world size of a checkpoint


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """Join the launcher's process group, or make a single-process one (plain ``python``)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def log0(*args: Any) -> None:
    """Print on rank 0; through tqdm.write, so a line logged while the progress bar is drawn gets its own line."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        from tqdm import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
        sys.stdout.flush()


def _checkpoints(root: Path) -> list[Path]:
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
    found = _checkpoints(root)
    return found[-1] if found else None


def _encode_tensor(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _decode_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


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
# ZeRO stage, model
# ---------------------------------------------------------------------------------------------

_HF_DS_CONFIG: Any = None  # transformers' HfDeepSpeedConfig of a ZeRO-3 run (load_model)


def decoder_layer_classes(model: torch.nn.Module) -> list[type]:
    """The model's decoder-layer classes (transformers' ``_no_split_modules``) that it really contains."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(m) for m in model.modules() if type(m).__name__ in names}, key=lambda c: c.__name__)


def load_model(cfg: TrainConfig, model_path: str, ds_config: dict[str, Any], dtype: torch.dtype, attn_implementation: str,
               random_weights: bool = False) -> torch.nn.Module:
    """The causal LM for training: partitioned at load under ZeRO-3, decoder layers marked as ZeRO-3
    leaf modules (``train.zero3_leaf_modules``), gradient checkpointing as configured, no KV cache."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    global _HF_DS_CONFIG
    stage = ds_config["zero_optimization"]["stage"]
    # While this object lives, from_pretrained partitions the weights as it loads them (zero.Init);
    # it stays alive for the process, as transformers' DeepSpeed integration expects.
    _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    trust = cfg.trust_remote_code
    if random_weights:  # benchmarks: the same compute without a weights file
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path, trust_remote_code=trust), dtype=dtype,
                                                 attn_implementation=attn_implementation, trust_remote_code=trust)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if stage == 3 and cfg.train.zero3_leaf_modules:
        from deepspeed.utils import set_z3_leaf_modules

        classes = decoder_layer_classes(model)
        if classes:
            # One gather per layer instead of one per projection/norm: the per-module hooks are the cost.
            set_z3_leaf_modules(model, classes)
            log0(f"zero3 leaf modules: {', '.join(c.__name__ for c in classes)}")
        else:
            log0(f"zero3 leaf modules: {type(model).__name__} names no decoder-layer class (_no_split_modules); per-module gathers")
    return model


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


def _empty_batch(pad_id: int) -> dict[str, Any]:
    """A one-token batch with nothing to train: a rank out of data still joins ZeRO-3's collectives."""
    return {"input_ids": torch.tensor([pad_id]), "position_ids": torch.tensor([0]), "seq_lens": [1],
            "loss_mask": torch.tensor([False]), "score": torch.tensor([0.0]), "ref_loss": None, "ids": [], "empty": True}


def next_step_batches(batches: Iterator[dict[str, Any]], grad_accum: int, pad_id: int, device: torch.device) -> list[dict[str, Any]] | None:
    """The ``grad_accum`` micro-batches of one optimizer step on this rank; None once every rank is out.

    A rank whose data ends first pads its step with empty batches, so every example is trained on
    exactly once per epoch even when ranks hold different numbers of micro-batches.
    """
    step: list[dict[str, Any]] = []
    for _ in range(grad_accum):
        batch = next(batches, None)
        step.append(batch if batch is not None else _empty_batch(pad_id))
    has_data = torch.tensor([float(any(not b.get("empty") for b in step))], device=device)
    dist.all_reduce(has_data, op=dist.ReduceOp.MAX)
    return step if has_data.item() > 0 else None


def group_masks(step: list[dict[str, Any]], cfg: TrainConfig, threshold: CorpusCut | None) -> list[torch.Tensor]:
    """Important-token masks of the step's micro-batches at ``importance.rho`` in ``importance.scope`` (the batch
    scope across the step's micro-batches on every rank; ties broken by a hash of example id and position)."""
    return step_important_masks(step, cfg.importance.rho, cfg.importance.scope, threshold)


def run_micro_batch(engine: Any, batch: dict[str, Any], important: torch.Tensor, loss_fn: Any, step_tokens: int,
                    progress: float, cfg: TrainConfig, device: torch.device, scale: float,
                    weighting: dict[str, Any] | None = None, decision: Any = None) -> dict[str, float]:
    """Forward, backward and (at the step's last micro-batch) optimizer step of one packed micro-batch.
    ``decision``: the step's group decision for this micro-batch (``loss.group_decision=step``), or None."""
    # DeepSpeed (0.19) advances ZeRO's micro-step counter in engine.forward(); we call engine.module
    # ourselves (train.forward.token_losses), so advance it here. Without this, ZeRO-3 copies each
    # micro-batch's gradient over the last one instead of accumulating: only the step's last
    # micro-batch would train (measured: step-1 grad norm = the last micro-batch's alone).
    if hasattr(engine.optimizer, "clear_backward_seen_flag"):
        engine.optimizer.clear_backward_seen_flag()
    # row_multiple: flex_attention pads rows to a fixed length so its kernel and BlockMask compile once.
    token_loss = token_losses(engine.module, batch["input_ids"].to(device), batch["position_ids"].to(device),
                              list(batch["seq_lens"]), batch["loss_mask"].to(device), chunk_size=cfg.train.ce_chunk,
                              row_multiple=cfg.data.micro_batch_tokens)
    trainable = batch["loss_mask"]
    ref = batch["ref_loss"][trainable].to(device) if batch.get("ref_loss") is not None else None
    extra = {} if weighting is None else {"weight": weighting["weight"][trainable].to(device), "step_weight": weighting["step_weight"]}
    if decision is not None:
        extra["decision"] = decision
    loss, metrics = loss_fn(token_loss, important[trainable].to(device), ref, step_tokens, progress, **extra)
    # The loss is this rank's exact share of the global objective; DeepSpeed averages gradients
    # over ranks and divides by grad_accum, so scale both back.
    engine.backward(loss * scale)
    dtype = "bfloat16" if engine.bfloat16_enabled() else "float32"
    if engine.is_gradient_accumulation_boundary() and train_config.trainer_clips_gradients(engine.zero_optimization_stage(), dtype):
        # Gradients are already averaged over ranks here (stage 0 all-reduces in backward).
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(engine.module.parameters(), max_norm))
    engine.step()
    return metrics


def train_step(engine: Any, micro: list[dict[str, Any]], loss_fn: Any, cfg: TrainConfig, threshold: float | None,
               progress: float, device: torch.device, corpus_quantiles: list[float] | None = None
               ) -> tuple[list[dict[str, float]], int, int]:
    """One optimizer step over its micro-batches: returns their metrics, the step's trainable tokens
    (all ranks: every loss normalises by it) and the tokens seen (all ranks, for tokens/s). A loss
    with per-token weights (``needs_weights``) also gets the step's weight sum over all ranks.

    ``loss.group_decision=step``: a loss that decides groups (``decides_per_step``: sftgo, rho1,
    select) decides once over every micro-batch of the step on every rank before any backward; sftgo
    and rho1 (``needs_lookahead``) first compute every micro-batch's per-token losses in a no-grad
    forward with the same weights. With one micro-batch per step the per-micro-batch decision (all
    ranks) already is the step's, so nothing extra runs."""
    weights = None
    if loss_fn.needs_weights:
        weights = [loss_fn.token_weights(b["score"], b["loss_mask"], list(b["seq_lens"]), cfg.importance.scope, corpus_quantiles)
                   for b in micro]
    counts = torch.tensor([float(sum(int(b["loss_mask"].sum()) for b in micro)),
                           float(sum(len(b["input_ids"]) for b in micro if not b.get("empty"))),
                           float(sum(w.double().sum() for w in weights)) if weights else 0.0],
                          device=device, dtype=torch.float64)
    dist.all_reduce(counts)
    step_tokens, seen_tokens, step_weight = int(counts[0].item()), int(counts[1].item()), float(counts[2].item())
    masks = group_masks(micro, cfg, threshold)
    decisions: list[Any] = [None] * len(micro)
    if cfg.loss.group_decision == "step" and loss_fn.decides_per_step and len(micro) > 1:
        trainable = [b["loss_mask"] for b in micro]
        ahead = None
        if loss_fn.needs_lookahead:
            # The decision needs the whole step's live losses before the first backward: a forward
            # without a graph (every rank runs one per micro-batch, as ZeRO-3's gathers require).
            with torch.no_grad():
                ahead = [token_losses(engine.module, b["input_ids"].to(device), b["position_ids"].to(device), list(b["seq_lens"]),
                                      b["loss_mask"].to(device), chunk_size=cfg.train.ce_chunk, row_multiple=cfg.data.micro_batch_tokens)
                         for b in micro]
        refs = [b["ref_loss"][t].to(device) if b.get("ref_loss") is not None else None for b, t in zip(micro, trainable)]
        decisions = loss_fn.decide([m[t].to(device) for m, t in zip(masks, trainable)], ahead, refs)
    scale = float(dist.get_world_size() * cfg.train.grad_accum)
    parts = [run_micro_batch(engine, b, m, loss_fn, step_tokens, progress, cfg, device, scale,
                             None if weights is None else {"weight": w, "step_weight": step_weight}, d)
             for b, m, w, d in zip(micro, masks, weights or [None] * len(micro), decisions)]
    return parts, step_tokens, seen_tokens


def evaluate(engine: Any, stream: ShardStream, cfg: TrainConfig, threshold: CorpusCut | None, device: torch.device,
             pad_id: int) -> dict[str, float]:
    """Held-out CE, per-group losses and greedy accuracies over the validation shards, grouped by
    ``train_config.eval_grouping(cfg)`` (sums all-reduced over ranks)."""
    from train.heldout import GROUP_SUM_NAMES, group_loss_sums, summarize_group_sums

    _, rho, scope = train_config.eval_grouping(cfg)
    engine.module.eval()
    sums = torch.zeros(len(GROUP_SUM_NAMES), dtype=torch.float64, device=device)
    batches = stream.micro_batches(cfg.data.micro_batch_tokens)
    count = 0
    with torch.no_grad():
        while True:
            step = next_step_batches(batches, 1, pad_id, device)
            if step is None or (cfg.eval.max_batches and count >= cfg.eval.max_batches):
                break
            important = step_important_masks(step, rho, scope, threshold)[0]
            sums += group_loss_sums(engine.module, step[0], important, device, chunk_size=cfg.train.ce_chunk,
                                    row_multiple=cfg.data.micro_batch_tokens)
            count += 1
    dist.all_reduce(sums)
    engine.module.train()
    # The same sums -> losses as python -m train.evaluate (train/heldout.py).
    summary = summarize_group_sums(sums)
    return {"eval_ce": summary["ce"], "eval_important_loss": summary["important_loss"],
            "eval_unimportant_loss": summary["unimportant_loss"],
            "eval_worse_group": 1 if summary["worse_group"] == "important" else 0, "eval_tokens": float(summary["tokens"]),
            "eval_accuracy": summary["accuracy"], "eval_important_accuracy": summary["important_accuracy"],
            "eval_unimportant_accuracy": summary["unimportant_accuracy"]}


def save_checkpoint(engine: Any, stream: ShardStream, root: Path, step: int, rank: int, keep: int, extra: dict[str, Any],
                    trained: dict[int, list[int]]) -> Path:
    """Model, optimizer, scheduler (DeepSpeed's files), plus our own state as JSON (never pickled): per-rank
    data position, RNG and examples / tokens trained per epoch, and trainer_state.json (step, ZeRO stage,
    world size, ``extra``); COMPLETED last."""
    tag = f"step_{step}"
    path = root / tag
    engine.save_checkpoint(str(root), tag=tag)
    atomic_write_text(path / f"data_rank{rank}.json", json.dumps(stream.state_dict()))
    atomic_write_text(path / f"trained_rank{rank}.json", json.dumps(trained))
    atomic_write_text(path / f"rng_rank{rank}.json", json.dumps(rng_state()))
    dist.barrier()
    if rank == 0:
        state = {"step": step, "zero_stage": engine.zero_optimization_stage(), "world_size": dist.get_world_size(), **extra}
        atomic_write_text(path / TRAINER_STATE, json.dumps(state))
        atomic_write_text(path / COMPLETED, json.dumps({"step": step}))
        for old in _checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        kept = _checkpoints(root)
        log0(f"checkpoint step {step}: {_gib(_folder_bytes(path))} in {path} ({len(kept)} kept, "
             f"{_gib(sum(_folder_bytes(k) for k in kept))} in all; checkpoint.keep={keep})")
    dist.barrier()
    return path


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def finished_run(out: Path, config_sha256: str) -> dict[str, Any] | None:
    """train_summary.json of a run that finished (model exported) with exactly this config, else None."""
    summary = out / "train_summary.json"
    if not summary.is_file() or not (out / "model" / "config.json").is_file():
        return None
    try:
        done = json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return done if isinstance(done, dict) and done.get("config_sha256") == config_sha256 else None


def check_resumable(path: Path, zero_stage: int, world_size: int) -> None:
    """Refuse (ValueError) a checkpoint written at another ZeRO stage or world size: DeepSpeed's
    files differ by stage and its optimizer shards by rank count."""
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


def load_checkpoint(engine: Any, stream: ShardStream, path: Path, rank: int) -> int:
    """Restore what :func:`save_checkpoint` wrote (engine, data position, RNG); returns the step."""
    engine.load_checkpoint(str(path.parent), tag=path.name)  # DeepSpeed's own files: pickles (README: trust them)
    stream.load_state_dict(json.loads((path / f"data_rank{rank}.json").read_text()))
    set_rng_state(json.loads((path / f"rng_rank{rank}.json").read_text()))
    return int(json.loads((path / TRAINER_STATE).read_text())["step"])


def load_trained_counts(path: Path, rank: int) -> dict[int, list[int]]:
    """This rank's examples and trainable tokens trained per epoch, as :func:`save_checkpoint` wrote them."""
    return {int(epoch): list(counts) for epoch, counts in json.loads((path / f"trained_rank{rank}.json").read_text()).items()}


def count_trained(trained: dict[int, list[int]], micro: list[dict[str, Any]]) -> None:
    """Add a step's micro-batches to ``trained``: per epoch, [examples, trainable tokens] on this rank."""
    for batch in micro:
        if not batch.get("empty"):
            counts = trained.setdefault(int(batch["epoch"]), [0, 0])
            counts[0] += len(batch["ids"])
            counts[1] += int(batch["loss_mask"].sum())


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


def start_wandb(cfg: TrainConfig, out: Path) -> Any:
    """A Weights & Biases run for ``out`` (rank 0): one run id per output_dir, kept in ``out/wandb_run_id``, so a
    resumed run continues the same W&B run; files under ``out/wandb``. Project: $WANDB_PROJECT, else sftgo."""
    import wandb

    id_file = out / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    atomic_write_text(id_file, run_id + "\n")
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sftgo"), name=out.name, id=run_id, resume="allow",
                     dir=str(out), config=yaml.safe_load(train_config.format_config(cfg)))
    run.define_metric("*", step_metric="step")  # redone steps after a resume log again under their own step
    return run


def export_model(engine: Any, tokenizer: Any, out: Path, rank: int, card: str | None = None) -> None:
    """A standard Hugging Face folder (safetensors, config, generation_config, tokenizer, model card
    ``card`` as README.md) that from_pretrained loads; it appears whole or not at all."""
    from train.card import generation_config

    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers ZeRO-3 partitions on rank 0
    else:
        state = engine.module.state_dict()  # stages 0-2 keep whole weights on every rank
    if rank == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        generation_config(model, tokenizer).save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    dist.barrier()


def build_engine(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict[str, Any], total_steps: int) -> tuple[Any, Any]:
    """The DeepSpeed engine (any ZeRO stage) around ``model`` with a client AdamW (nothing to compile) and the LR schedule."""
    import deepspeed

    # Weight decay on matrices only; ZeRO-3 has already partitioned the parameters (p.shape is empty),
    # so read the full shape from ds_shape.
    def is_matrix(name: str, param: torch.nn.Parameter) -> bool:
        return len(getattr(param, "ds_shape", param.shape)) >= 2 and "norm" not in name

    params = list(model.named_parameters())
    groups = [{"params": [p for n, p in params if is_matrix(n, p)], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for n, p in params if not is_matrix(n, p)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    # The scheduler is built on DeepSpeed's wrapped optimizer (a callable), so their param groups agree.
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda wrapped: make_scheduler(wrapped, total_steps, cfg.optim))
    return engine, scheduler


# ---------------------------------------------------------------------------------------------
# Main
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


def main(argv: list[str] | None = None) -> int:
    """Train; on Ctrl-C (exit 130) or SIGTERM (exit 143): one line saying where the same command resumes,
    unfinished checkpoint folders removed, no traceback."""
    progress = Progress()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    # Ctrl-C's KeyboardInterrupt even when started from a script's background `&`, which leaves SIGINT
    # ignored (Python then keeps it ignored): `kill -INT` must stop a run as it stops annotate.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(argv, progress)
    except (KeyboardInterrupt, Terminated) as exc:
        code, name = (143, "SIGTERM") if isinstance(exc, Terminated) else (130, "Ctrl-C")
        # Ignore a second signal while cleaning up: the line below must be printed whole.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        done = []
        if progress.ckpt_root is not None:
            for partial in progress.ckpt_root.glob("step_*"):
                if not (partial / COMPLETED).exists() and progress.rank == 0:
                    shutil.rmtree(partial, ignore_errors=True)  # a checkpoint cut off mid-write
            done = _checkpoints(progress.ckpt_root)
        where = f"from checkpoint step {done[-1].name.split('_')[1]}" if done else "from step 0 (no checkpoint was finished)"
        if progress.rank == 0:
            print(f"\ninterrupted ({name}) at step {progress.step}; the same command resumes {where}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def plan_steps(cfg: TrainConfig, stream: ShardStream, world_size: int) -> tuple[StreamPlan, int]:
    """The dry pack of the configured epochs (one epoch under ``train.max_steps``) and the optimizer steps to run:
    ``train.max_steps`` when set (it overrides epochs, cycling the data), else exactly what the epochs pack into."""
    epochs = 1 if cfg.train.max_steps else cfg.train.epochs
    plan = stream.plan(cfg.data.micro_batch_tokens, max(1, cfg.data.num_workers), epochs)
    return plan, (cfg.train.max_steps or plan.steps(cfg.train.grad_accum))


def describe_plan(cfg: TrainConfig, plan: StreamPlan, total_steps: int, world_size: int) -> list[str]:
    """What will be trained, in lines: data per epoch, micro-batches and steps, and what max_steps overrides."""
    epochs = 1 if cfg.train.max_steps else cfg.train.epochs
    per_epoch = [sum(plan.micro_batches[r][e] for r in range(world_size)) for e in range(epochs)]
    busiest = max(sum(row) for row in plan.micro_batches)
    lines = [f"data: {plan.examples} examples, {plan.tokens} tokens, {plan.trainable_tokens} trainable tokens per epoch"
             + (f" ({plan.skipped} examples without a trainable token are never trained)" if plan.skipped else ""),
             f"packing: {per_epoch[0]} micro-batches of <= {cfg.data.micro_batch_tokens} tokens per epoch over {world_size} "
             f"rank(s) (ranks balanced by tokens; the busiest holds {busiest} in {epochs} epoch(s)); a step = "
             f"{cfg.train.grad_accum} micro-batch(es) per rank"]
    steps_per_epoch = plan.steps(cfg.train.grad_accum) / epochs
    if cfg.train.max_steps:
        lines.append(f"steps: train.max_steps={cfg.train.max_steps} overrides train.epochs={cfg.train.epochs}: exactly "
                     f"{total_steps} steps, ~{total_steps / steps_per_epoch:.2f} epochs of data (cycling as needed)")
    else:
        lines.append(f"steps: {total_steps} for {cfg.train.epochs} epoch(s), every example exactly once per epoch "
                     f"(~{steps_per_epoch:.1f} steps per epoch; a last partial step is normalised by its own tokens)")
    tokens_per_step = plan.tokens * epochs / max(1, plan.steps(cfg.train.grad_accum))
    lines.append(f"per step: ~{tokens_per_step:.0f} tokens (~{tokens_per_step / world_size:.0f} per rank), "
                 f"~{plan.examples * epochs / max(1, plan.steps(cfg.train.grad_accum)):.1f} examples")
    return lines


def dry_run(cfg: TrainConfig) -> int:
    """``--dry-run``: resolve the config, open and pack the data, load no weights; print what would be trained."""
    from data.models import load_tokenizer, resolve_model
    from schemas.shard import tokenizer_fingerprint
    from train.schedule import lr_at

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        model_path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, option="trust_remote_code=true")
        manifest = open_annotated(cfg.data.train, tokenizer_fingerprint(tokenizer)["sha256"], cfg.importance.scorer)
        train_config.validate_against_data(cfg, manifest)
        stream = ShardStream(cfg.data.train, manifest, cfg.importance.scorer, rank=0, world_size=world_size, seed=cfg.seed,
                             shuffle=cfg.data.shuffle, balance_tokens=True)
        plan, total_steps = plan_steps(cfg, stream, world_size)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype_name = train_config.resolve_dtype(cfg, cuda=device.type == "cuda")
        zero_stage, why = resolve_zero_stage(cfg, model_path, world_size, device, dtype_name)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    lines = [f"dry run ({world_size} rank(s): WORLD_SIZE sets it); nothing is loaded or trained",
             f"objective: {loss_fn.describe()}"]
    decision = getattr(cfg.loss, "group_decision", None)
    if decision is not None:
        lines.append(f"group decision: {decision}")
    share = realised_important_share(cfg.data.train, cfg.importance.scorer, cfg.importance.rho, cfg.importance.scope)
    lines.append(f"groups: {cfg.importance.scorer} at rho {cfg.importance.rho} in the {cfg.importance.scope} scope; "
                 f"realised important share {share['share']:.4f} (1 - rho = {share['target']:.4f}; {share['method']})")
    lines += describe_plan(cfg, plan, total_steps, world_size)
    lambda_at = getattr(loss_fn, "lambda_at", None)
    if lambda_at is not None:
        lines.append(f"lambda: {lambda_at(0.0):.4g} at the first step, {lambda_at(1.0):.4g} at the last")
    lines.append(f"lr: {cfg.optim.lr * lr_at(0, total_steps, cfg.optim):.4g} at the first step, "
                 f"{cfg.optim.lr * lr_at(total_steps - 1, total_steps, cfg.optim):.4g} at the last ({cfg.optim.schedule})")
    lines.append(f"zero stage {zero_stage}: {why}")
    print("\n".join(lines))
    return 0


def run(argv: list[str] | None, progress: Progress) -> int:
    """The whole run: setup, train, save (``--dry-run``: setup only, printing what would be trained)."""
    # -- config: everything checked before any model loads ------------------------------------------
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv
    argv = [a for a in argv if a != "--dry-run"]
    try:
        cfg = train_config.load_config(argv)
        train_config.validate(cfg)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if dry:
        return dry_run(cfg)
    rank, world_size, device = setup_distributed()
    from data.models import load_tokenizer, resolve_model
    from schemas.shard import tokenizer_fingerprint

    def refuse(message: str) -> int:
        log0(f"error: {message}")
        dist.destroy_process_group()
        return 2

    eval_scorer, eval_rho, eval_scope = train_config.eval_grouping(cfg)
    try:
        model_path = resolve_model(cfg.model)
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, option="trust_remote_code=true")
        fingerprint = tokenizer_fingerprint(tokenizer)["sha256"]
        manifest = open_annotated(cfg.data.train, fingerprint, cfg.importance.scorer, deep=cfg.data.deep_validate)
        train_config.validate_against_data(cfg, manifest)
        val_manifest = None
        if cfg.data.validation:
            val_manifest = open_annotated(cfg.data.validation, fingerprint, eval_scorer, deep=cfg.data.deep_validate)
            if cfg.eval.scorer:  # a grouping of its own: only its score matters there
                train_config.validate_eval_data(cfg, val_manifest, cfg.data.validation)
            else:
                train_config.validate_against_data(cfg, val_manifest, uri=cfg.data.validation)
    except (ValueError, OSError) as exc:
        return refuse(str(exc))

    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    progress.ckpt_root, progress.rank = ckpt_root, rank
    # The config and what the data holds for this run (rows, tokens, tokenizer, the chosen score's
    # statistics): columns added later by --add-scorers (ref_loss) do not make a finished run stale.
    data_key = [{"totals": m.totals, "tokenizer": m.tokenizer.get("sha256"), "score": m.score_stats.get(cfg.importance.scorer)}
                for m in (manifest, val_manifest) if m is not None]
    config_sha256 = hashlib.sha256((train_config.format_config(cfg) + json.dumps(data_key, sort_keys=True, default=str)).encode()).hexdigest()
    # What decides the weights: every weight key of the config and the training data's fingerprint.
    identity = {**train_config.weight_keys(cfg),
                "data.train (contents)": hashlib.sha256(json.dumps(data_key[0], sort_keys=True, default=str).encode()).hexdigest()}
    finished = finished_run(out, config_sha256)
    if finished is not None:  # a rerun of a finished command (make demo twice): nothing to redo
        log0(f"{out}: already trained with this config ({finished['steps']} steps); model in {out / 'model'}. "
             "Nothing to do (another output_dir or any changed key trains again)")
        dist.destroy_process_group()
        return 0
    explicit_resume = cfg.checkpoint.resume not in ("auto", "never", "")
    resume = resume_path(cfg, ckpt_root)
    history: dict[str, Any] = {"start": "fresh"}
    if resume is not None:  # before any model loads: a checkpoint of another run, stage or world cannot resume
        recorded = json.loads((resume / TRAINER_STATE).read_text()).get("identity") if (resume / TRAINER_STATE).is_file() else None
        mismatch = run_mismatch(recorded, identity, f"checkpoint {resume.name}", out)
        if mismatch is not None and not explicit_resume:
            return refuse(mismatch)
        history = {"start": f"resumed from {resume}"}
        if mismatch is not None:
            history["changed_keys"] = train_config.changed_keys(recorded or {}, identity)
    elif cfg.checkpoint.resume != "never" and (out / "train_summary.json").is_file():
        # A finished run whose checkpoints are gone (keep_final: false): its model and card must not be overwritten
        # by another config's run unnoticed.
        recorded = json.loads((out / "train_summary.json").read_text()).get("identity")
        mismatch = run_mismatch(recorded, identity, "a finished run", out)
        if mismatch is not None:
            return refuse(mismatch)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        train_config.save_config(cfg, out / "config.yaml")
        log0("== train config ==\n" + train_config.format_config(cfg))
        if "changed_keys" in history:
            log0(f"checkpoint.resume={cfg.checkpoint.resume}: continuing under changed keys: " + "; ".join(history["changed_keys"]))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    dtype_name = train_config.resolve_dtype(cfg, cuda=device.type == "cuda")
    try:
        zero_plan = resolve_zero_stage(cfg, model_path, world_size, device, dtype_name)
        zero_stage, why = zero_plan
        ds_config = train_config.deepspeed_dict(cfg, world_size=world_size, dtype=dtype_name, zero_stage=zero_stage,
                                                offload_optimizer=zero_plan.offload_optimizer)
        if resume is not None:
            check_resumable(resume, zero_stage, world_size)
    except ValueError as exc:
        return refuse(str(exc))
    log0(f"zero stage {zero_stage}: {why}")
    attn_implementation = resolve_attn_implementation(cfg.train.attn_implementation, device.type, dtype_name)
    log0(f"attention: {attn_implementation}")
    needs_ref_loss = train_config.loss_class(cfg).needs_ref_loss
    # max_steps: an endless stream (the data cycles); else exactly train.epochs epochs.
    stream = ShardStream(cfg.data.train, manifest, cfg.importance.scorer, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         with_ref_loss=needs_ref_loss, epochs=None if cfg.train.max_steps else cfg.train.epochs,
                         balance_tokens=True)
    plan, total_steps = plan_steps(cfg, stream, world_size)
    if plan.loss_mask_tokens != manifest.totals.get("trainable_tokens", plan.loss_mask_tokens):
        return refuse(f"{cfg.data.train}: the manifest counts {manifest.totals['trainable_tokens']} trainable tokens, the "
                      f"shards' loss_mask holds {plan.loss_mask_tokens}; run python -m schemas.validate on it")
    for line in describe_plan(cfg, plan, total_steps, world_size):
        log0(line)
    threshold = manifest_corpus_cut(manifest, cfg.importance.scorer, cfg.importance.rho) if cfg.importance.scope == "corpus" else None
    # The score's quantile sketch: rank weights in the corpus scope read the score's CDF off it.
    corpus_quantiles = (manifest.score_stats.get(cfg.importance.scorer) or {}).get("quantiles") if cfg.importance.scope == "corpus" else None
    share = realised_important_share(cfg.data.train, cfg.importance.scorer, cfg.importance.rho, cfg.importance.scope)
    log0(f"groups: {cfg.importance.scorer} at rho {cfg.importance.rho} ({cfg.importance.scope} scope): realised important "
         f"share {share['share']:.4f}, 1 - rho = {share['target']:.4f}")
    if (warning := important_share_warning(share)) is not None:
        log0(f"warning: {warning}")

    # -- model and engine -------------------------------------------------------------------------------
    step = 0
    trained: dict[int, list[int]] = {}  # this rank's [examples, trainable tokens] per epoch
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    model = load_model(cfg, model_path, ds_config, dtype, attn_implementation)
    engine, scheduler = build_engine(model, cfg, ds_config, total_steps)
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # -- resume ---------------------------------------------------------------------------------------
    if resume is not None:
        step = load_checkpoint(engine, stream, resume, rank)
        trained = load_trained_counts(resume, rank)
        progress.step = step
        log0(f"resumed from {resume} at step {step}")

    # One held-out stream (its footers read once); every evaluation rewinds it to its start.
    val_stream = (ShardStream(cfg.data.validation, val_manifest, eval_scorer, shuffle=False, epochs=1)
                  if val_manifest is not None else None)
    val_start = val_stream.state_dict() if val_stream is not None else None
    val_threshold = None
    if val_manifest is not None and eval_scope == "corpus":
        # The training data's cut when it holds the score (so "important" means what it meant in training).
        cut_from = manifest if (manifest.score_stats.get(eval_scorer) or {}).get("quantiles") else val_manifest
        val_threshold = manifest_corpus_cut(cut_from, eval_scorer, eval_rho)
    if val_manifest is not None:
        log0(f"evaluation groups: {eval_scorer} at rho {eval_rho} ({eval_scope} scope)")

    # -- logging --------------------------------------------------------------------------------------
    writer = None
    metrics_file = None
    wandb_run = None
    if rank == 0:
        # A fresh start replaces an old metrics.jsonl; a resumed run continues it (redone steps log again).
        metrics_file = open(out / "metrics.jsonl", "a" if resume is not None else "w", encoding="utf-8")
        with open(out / "run_history.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step, **history}) + "\n")
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in cfg.report_to:
            wandb_run = start_wandb(cfg, out)
    # MFU: the model's real FLOPs per step over the device's own peak (train/mfu.py; not reported where unknown).
    model_flops, peak = ModelFlops.of(engine.module), device_peak_flops(device, dtype_name)
    timer = StepTimer(device)

    def log(record: dict[str, Any]) -> None:
        if rank != 0:
            return
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(key, value, record["step"])
        if wandb_run is not None:  # the same keys as metrics.jsonl, "step" the x axis
            wandb_run.log({key: value for key, value in record.items() if isinstance(value, (int, float))})

    def checkpoint_extra() -> dict[str, Any]:
        return {"total_steps": total_steps, "identity": identity}

    # -- train ----------------------------------------------------------------------------------------
    from tqdm import tqdm

    batches = stream.micro_batches(cfg.data.micro_batch_tokens, num_workers=cfg.data.num_workers)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    engine.module.train()
    while step < total_steps:
        timer.start()
        micro = next_step_batches(batches, cfg.train.grad_accum, pad_id, device)
        if micro is None:  # the plan says how many steps the epochs hold: running out early is a bug
            return refuse(f"the data ran out after {step} of {total_steps} planned steps; please report this with the config")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler steps inside train_step)
        count_trained(trained, micro)
        parts, step_tokens, seen_tokens = train_step(engine, micro, loss_fn, cfg, threshold, step / max(1, total_steps - 1), device,
                                                     corpus_quantiles)
        step += 1
        progress.step = step
        seconds = timer.stop()
        # Loss and FLOPs summed over ranks in one collective.
        total_loss = torch.tensor([sum(p["loss"] for p in parts), model_flops.step_flops(micro)], device=device, dtype=torch.float64)
        dist.all_reduce(total_loss)
        weights = [p.get("tokens", 0) for p in parts]
        weight_sum = sum(weights) or 1

        def mean(key: str) -> float:
            return float(sum(p[key] * w for p, w in zip(parts, weights)) / weight_sum)

        record = {
            "step": step, "loss": float(total_loss[0].item()), "ce": mean("ce"), "important_loss": mean("important_loss"),
            "unimportant_loss": mean("unimportant_loss"), "worse_group": mean("worse_group"), "lambda": parts[-1]["lambda"],
            "important_fraction": mean("important_fraction"), "lr": lr,
            "grad_norm": parts[-1].get("grad_norm", float(engine.get_global_grad_norm() or 0.0)), "tokens_per_s": seen_tokens / seconds,
            "trainable_tokens": step_tokens, "epoch": stream.epoch, "skipped_no_trainable": stream.skipped_no_trainable,
        }
        if "mean_weight" in parts[0]:
            record["mean_weight"] = mean("mean_weight")
        utilisation = mfu(float(total_loss[1].item()), seconds, peak, world_size)
        if utilisation is not None:
            record["mfu"] = utilisation
        if val_stream is not None and cfg.eval.every and step % cfg.eval.every == 0:
            val_stream.load_state_dict(val_start)
            record.update(evaluate(engine, val_stream, cfg, val_threshold, device, pad_id))
        log(record)
        if step % cfg.train.log_every == 0:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}", imp=f"{record['important_loss']:.3f}",
                            unimp=f"{record['unimportant_loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < total_steps:
            save_checkpoint(engine, stream, ckpt_root, step, rank, cfg.checkpoint.keep, checkpoint_extra(), trained)
    bar.close()

    # -- what was trained -------------------------------------------------------------------------------
    per_epoch = gather_trained(trained, device)
    problems = [] if cfg.train.max_steps else epoch_problems(per_epoch, plan, cfg.train.epochs)
    if problems:  # never a silent short epoch: nothing is exported, the summary says why
        if rank == 0:
            atomic_write_text(out / "train_summary.json", json.dumps({
                "steps": step, "total_steps": total_steps, "epochs_trained": per_epoch, "error": problems}, indent=2))
        return refuse("what was trained is not train.epochs x every example once: " + "; ".join(problems))

    # -- save -------------------------------------------------------------------------------------------
    final_eval = None
    if val_stream is not None:
        val_stream.load_state_dict(val_start)
        final_eval = evaluate(engine, val_stream, cfg, val_threshold, device, pad_id)
        log({"step": step, **final_eval})
        log0("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in final_eval.items()))
    save_checkpoint(engine, stream, ckpt_root, step, rank, cfg.checkpoint.keep, checkpoint_extra(), trained)
    card = model_card(base_model=cfg.model, loss_name=cfg.loss.name, objective=loss_fn.describe(),
                      loss_options=train_config.loss_options(cfg), scorer=cfg.importance.scorer, rho=cfg.importance.rho,
                      scope=cfg.importance.scope, train_data=cfg.data.train, train_manifest_sha256=manifest_sha256(cfg.data.train),
                      validation_data=cfg.data.validation or None, steps=step, total_steps=total_steps, final_eval=final_eval,
                      config_yaml=train_config.format_config(cfg)) if rank == 0 else None
    export_model(engine, tokenizer, out / "model", rank, card)
    if rank == 0:
        metrics_file.close()
        if writer is not None:
            writer.close()
        if wandb_run is not None:
            wandb_run.finish()
        runs = [json.loads(line) for line in (out / "run_history.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
        atomic_write_text(out / "train_summary.json", json.dumps({
            "steps": step, "total_steps": total_steps, "max_steps": cfg.train.max_steps or None,
            "epochs": None if cfg.train.max_steps else cfg.train.epochs, "epochs_trained": per_epoch,
            "data_per_epoch": {"examples": plan.examples, "trainable_tokens": plan.trainable_tokens, "skipped_no_trainable": plan.skipped},
            "important_share": {key: share[key] for key in ("share", "target", "differs", "scope", "method")},
            "skipped_no_trainable": stream.skipped_no_trainable,
            "config_sha256": config_sha256, "identity": identity, "history": runs}, indent=2))
        if not cfg.checkpoint.keep_final:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            log0(f"checkpoint.keep_final=false: deleted {ckpt_root}")
        log0(f"done: {step} steps; model in {out / 'model'} ({_gib(_folder_bytes(out / 'model'))}), metrics in {out / 'metrics.jsonl'}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
