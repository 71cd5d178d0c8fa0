"""What a run will train, before it trains: the steps the data packs into, the lines that say so, ``--dry-run``.

    plan, total_steps = plan_steps(cfg, stream, world_size)   # the dry pack of the configured epochs
    for line in describe_plan(cfg, plan, total_steps, world_size): log0(line)

The step count comes from packing the real lengths (``ShardStream.plan``), never from an estimate:
``train.epochs`` epochs train every example exactly once each; ``train.max_steps`` overrides them.
"""

from __future__ import annotations

import os
import sys

import torch

from typing import Any

from data.shard_stats import important_share_warning, realised_important_share
from data import config as config_mechanism
from train import config as train_config
from train.config import TrainConfig
from train.engine import resolve_zero_stage
from train.grouping import CorpusCut, manifest_corpus_cut
from train.losses import build_loss
from train.metrics import log0
from train.shards import NO_SCORE, ShardStream, StreamPlan, open_annotated
from train.sources import describe_sources


def open_data(cfg: TrainConfig) -> tuple[str, Any, Any, Any]:
    """The model folder, tokenizer and the manifests of data.train and data.validation (None without one), each
    checked against the config (ValueError / OSError naming the problem; ``data.deep_validate`` reads every shard).
    A directory that cannot be opened is named with its key and where the value was set (a --config file, the command line)."""
    from data.models import load_tokenizer, resolve_model
    from schemas.shard import tokenizer_fingerprint

    eval_scorer = train_config.eval_grouping(cfg)[0]
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, option="trust_remote_code=true")
    fingerprint = tokenizer_fingerprint(tokenizer)["sha256"]
    manifest = _open(cfg, "data.train", fingerprint, cfg.importance.scorer)
    train_config.validate_against_data(cfg, manifest)
    val_manifest = None
    if cfg.data.validation:
        val_manifest = _open(cfg, "data.validation", fingerprint, eval_scorer)
        if cfg.eval.scorer:  # a grouping of its own: only its score matters there
            train_config.validate_eval_data(cfg, val_manifest, cfg.data.validation)
        else:
            train_config.validate_against_data(cfg, val_manifest, uri=cfg.data.validation)
    return model_path, tokenizer, manifest, val_manifest


def _open(cfg: TrainConfig, key: str, fingerprint: str, scorer: str) -> Any:
    """The annotated directory of ``key`` (data.train / data.validation), opened and checked; an error names the
    key and where its value was set (a --config file, the command line)."""
    uri = getattr(cfg.data, key.split(".")[1])
    try:
        return open_annotated(uri, fingerprint, scorer, deep=cfg.data.deep_validate)
    except (ValueError, OSError) as exc:
        kind = ValueError if isinstance(exc, ValueError) else OSError
        raise kind(f"{key} (set {config_mechanism.origin(cfg, key)}): {exc}") from None


# A CPU micro-batch above this many tokens makes a slow step. SmolLM2-135M (the default model) trains at ~57
# tokens/s on 2 CPU cores (bench/README.md, results/train_cpu_135m.json), so 2,048 tokens are already ~35 s a
# micro-batch, and the trainer's default 4,096 with gradient checkpointing took 47 s for the first step with nothing
# printed (issue 30); the CPU configs' 1,024 keep a step near 18 s.
CPU_SLOW_MICRO_BATCH_TOKENS = 2048
CPU_MICRO_BATCH_TOKENS = 1024  # what the warning suggests: the demo's and the CPU starter config's value


def slow_cpu_step_warning(cfg: TrainConfig, cuda: bool) -> str | None:
    """What makes a CPU run's first step slow, naming the setting to change, or None (on a GPU, or a quick config).

    Gradient checkpointing recomputes every layer's forward in backward (~30% more compute) to save activation
    memory, which a CPU run's host RAM rarely lacks; a micro-batch above :data:`CPU_SLOW_MICRO_BATCH_TOKENS`
    tokens makes each step long on its own."""
    if cuda:
        return None
    causes = []
    if cfg.train.gradient_checkpointing:
        causes.append("train.gradient_checkpointing is on (recomputes activations in backward, ~30% more compute; "
                      "host RAM rarely needs it): set train.gradient_checkpointing=false")
    if cfg.data.micro_batch_tokens > CPU_SLOW_MICRO_BATCH_TOKENS:
        causes.append(f"data.micro_batch_tokens is {cfg.data.micro_batch_tokens} (a step on 2 CPU cores takes ~1 s per "
                      f"60 tokens with SmolLM2-135M): set data.micro_batch_tokens={CPU_MICRO_BATCH_TOKENS}")
    if not causes:
        return None
    return ("no GPU: this CPU run's first step will be slow (the first log line may take minutes): "
            + "; ".join(causes) + " (train/configs/cpu_starter.yaml has both)")


def plan_grouping(cfg: TrainConfig, manifest: Any) -> tuple[CorpusCut | None, list[float] | None, dict[str, Any]]:
    """The corpus scope's cut and the score's quantile sketch (rank weights in the corpus scope read the score's
    CDF off it; both None in the other scopes), and the realised important share, logged (warned when off 1 - rho)."""
    imp = cfg.importance
    if imp.scorer == NO_SCORE:
        log0(f"groups: none (importance.scorer=none: {cfg.loss.name} reads no score; no group numbers are logged)")
        return None, None, {"share": None, "target": None, "differs": False, "scope": imp.scope, "method": "no score"}
    cut = manifest_corpus_cut(manifest, imp.scorer, imp.rho) if imp.scope == "corpus" else None
    quantiles = (manifest.score_stats.get(imp.scorer) or {}).get("quantiles") if imp.scope == "corpus" else None
    share = realised_important_share(cfg.data.train, imp.scorer, imp.rho, imp.scope)
    log0(f"groups: {imp.scorer} at rho {imp.rho} ({imp.scope} scope): realised important "
         f"share {share['share']:.4f}, 1 - rho = {share['target']:.4f}")
    if (warning := important_share_warning(share)) is not None:
        log0(f"warning: {warning}")
    return cut, quantiles, share


def open_stream(cfg: TrainConfig, manifest: Any, world_size: int) -> tuple[ShardStream, StreamPlan, int]:
    """data.train's stream for this rank, its plan and the steps to run, logged (:func:`describe_plan`). ValueError
    when the shards' loss_mask holds other trainable tokens than the manifest counts."""
    # max_steps: an endless stream (the data cycles); else exactly train.epochs epochs.
    stream = ShardStream(cfg.data.train, manifest, cfg.importance.scorer, seed=cfg.seed, shuffle=cfg.data.shuffle,
                         with_ref_loss=train_config.loss_class(cfg).needs_ref_loss,
                         epochs=None if cfg.train.max_steps else cfg.train.epochs, balance_tokens=True)
    plan, total_steps = plan_steps(cfg, stream, world_size)
    if plan.loss_mask_tokens != manifest.totals.get("trainable_tokens", plan.loss_mask_tokens):
        raise ValueError(f"{cfg.data.train}: the manifest counts {manifest.totals['trainable_tokens']} trainable tokens, the "
                         f"shards' loss_mask holds {plan.loss_mask_tokens}; run python -m schemas.validate on it")
    for line in describe_plan(cfg, plan, total_steps, world_size):
        log0(line)
    return stream, plan, total_steps


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
    if cfg.importance.scorer == NO_SCORE:
        lines.append(f"groups: none (importance.scorer=none: {cfg.loss.name} reads no score)")
    else:
        share = realised_important_share(cfg.data.train, cfg.importance.scorer, cfg.importance.rho, cfg.importance.scope)
        lines.append(f"groups: {cfg.importance.scorer} at rho {cfg.importance.rho} in the {cfg.importance.scope} scope; "
                     f"realised important share {share['share']:.4f} (1 - rho = {share['target']:.4f}; {share['method']})")
    lines += describe_plan(cfg, plan, total_steps, world_size)
    lines.append(describe_sources(stream.read_sources(), cfg.data.train))
    lambda_at = getattr(loss_fn, "lambda_at", None)
    if lambda_at is not None:
        lines.append(f"lambda: {lambda_at(0.0):.4g} at the first step, {lambda_at(1.0):.4g} at the last")
    lines.append(f"lr: {cfg.optim.lr * lr_at(0, total_steps, cfg.optim):.4g} at the first step, "
                 f"{cfg.optim.lr * lr_at(total_steps - 1, total_steps, cfg.optim):.4g} at the last ({cfg.optim.schedule})")
    lines.append(f"zero stage {zero_stage}: {why}")
    if (slow := slow_cpu_step_warning(cfg, cuda=device.type == "cuda")) is not None:
        lines.append(f"warning: {slow}")
    print("\n".join(lines))
    return 0
