"""What a run reports: lines on rank 0 (:func:`log0`) and metric records to every sink behind one call.

    metrics = Metrics.open(cfg, out, rank, resumed=True)
    metrics.log({"step": 3, "loss": 2.1, ...})     # metrics.jsonl, TensorBoard, W&B: the same keys
    metrics.close()

Sinks (``report_to``): ``metrics.jsonl`` always (a fresh start replaces it, a resumed run appends:
redone steps log again), ``tensorboard`` (``out/tensorboard``), ``wandb`` (one W&B run per output_dir,
its id kept in ``out/wandb_run_id`` so a resumed run continues it). Other ranks get a Metrics that
writes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import IO, Any

import torch.distributed as dist
import yaml

from schemas.shard import atomic_write_text
from train import config as train_config
from train.config import TrainConfig


def log0(*args: Any) -> None:
    """Print on rank 0; through tqdm.write, so a line logged while the progress bar is drawn gets its own line.

    Before the process group exists (the config and data checks run first) the launcher's ``RANK`` says which
    rank this is, so a refusal is printed once, not once per rank."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        from tqdm import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)
        sys.stdout.flush()


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


class Metrics:
    """The run's metric sinks; :meth:`log` writes one record (a dict with ``step``) to each, on rank 0 only."""

    def __init__(self, jsonl: IO[str] | None = None, tensorboard: Any = None, wandb_run: Any = None) -> None:
        self.jsonl, self.tensorboard, self.wandb_run = jsonl, tensorboard, wandb_run

    @classmethod
    def open(cls, cfg: TrainConfig, out: Path, rank: int, resumed: bool) -> Metrics:
        """The sinks ``cfg.report_to`` names under ``out`` (rank 0; other ranks: none)."""
        if rank != 0:
            return cls()
        jsonl = open(out / "metrics.jsonl", "a" if resumed else "w", encoding="utf-8")
        tensorboard = None
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            tensorboard = SummaryWriter(str(out / "tensorboard"))
        return cls(jsonl, tensorboard, start_wandb(cfg, out) if "wandb" in cfg.report_to else None)

    def log(self, record: dict[str, Any]) -> None:
        if self.jsonl is None:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb_run is not None:  # the same keys as metrics.jsonl, "step" the x axis
            self.wandb_run.log({key: value for key, value in record.items() if isinstance(value, (int, float))})

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


#: A step record's group keys, left out when the run has no groups (``importance.scorer=none``).
GROUP_KEYS = ("important_loss", "unimportant_loss", "worse_group", "important_fraction")


def step_record(step: int, parts: list[dict[str, float]], loss: float, groups: bool = True, **fields: Any) -> dict[str, Any]:
    """One optimizer step's record: ``loss`` (summed over ranks), the micro-batches' metrics (``parts``) as
    means weighted by their tokens, ``lambda`` of the last, then ``fields`` (lr, grad_norm, tokens_per_s, ...)
    in the order given after ``important_fraction`` (a field given as None is left out: ``mfu`` where the device's
    peak is unknown); ``mean_weight`` where the loss reports it. ``groups``
    False (no score, no groups): without :data:`GROUP_KEYS`, which would only say "no token is important"."""
    weights = [p.get("tokens", 0) for p in parts]
    weight_sum = sum(weights) or 1

    def mean(key: str) -> float:
        return float(sum(p[key] * w for p, w in zip(parts, weights)) / weight_sum)

    record = {"step": step, "loss": loss, **{key: mean(key) for key in ("ce", "important_loss", "unimportant_loss", "worse_group")},
              "lambda": parts[-1]["lambda"], "important_fraction": mean("important_fraction"),
              **{key: value for key, value in fields.items() if value is not None}}
    if "mean_weight" in parts[0]:
        record["mean_weight"] = mean("mean_weight")
    if not groups:
        record = {key: value for key, value in record.items() if key not in GROUP_KEYS}
    return record


def bar_postfix(record: dict[str, Any], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The progress bar's numbers of a step's record: loss, CE, the groups' losses (with groups), ``extra`` (the
    per-source CE), lr and tokens/s."""
    groups = {"imp": f"{record['important_loss']:.3f}", "unimp": f"{record['unimportant_loss']:.3f}"} if "important_loss" in record else {}
    return {"loss": f"{record['loss']:.3f}", "ce": f"{record['ce']:.3f}", **groups, **(extra or {}),
            "lr": f"{record['lr']:.2e}", "tok_s": f"{record['tokens_per_s']:.0f}"}


def format_record(record: dict[str, Any]) -> str:
    """``key=value`` pairs for a log line: integers (counts, flags: ``eval_worse_group=1``,
    ``eval_tokens=1016``) as they are, other numbers to 4 decimals."""
    return ", ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4f}" for k, v in record.items())
