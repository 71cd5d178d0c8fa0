"""One optimizer step, and the in-training evaluation: typed micro-batches -> groups -> forward, loss, backward.

    micro = next_step_batches(batches, cfg.train.grad_accum, pad_id, device)   # list[Batch], None once all ranks are out
    parts, step_tokens, seen_tokens = train_step(engine, micro, loss_fn, cfg, cut, progress, device)
    record = evaluate(engine, val_stream, cfg, val_cut, device, pad_id)          # eval_* keys

A step: count the step's trainable tokens (and a weighted loss's weight sum) over all ranks; group
every micro-batch's tokens at ``importance.rho`` in ``importance.scope`` (:func:`group_masks`);
prepare each micro-batch's loss inputs (``train.losses.loss_inputs``, as the TRL bridge does); with
``loss.group_decision=step``, decide the groups over the whole step first; then per micro-batch a
forward, the loss, a backward scaled to undo DeepSpeed's averaging, and DeepSpeed's step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from train import config as train_config
from train.config import TrainConfig
from train.forward import token_losses
from train.grouping import CorpusCut, manifest_corpus_cut, step_important_masks
from train.losses import LossInputs, loss_inputs
from train.metrics import log0
from train.shards import NO_SCORE, ShardStream
from train.sources import MAX_SOURCE_METRICS, add_source_sums, source_keys

#: The per-source held-out numbers the trainer logs (``eval_source/<key>/<name>``), of train.heldout.source_summaries.
SOURCE_EVAL_NAMES = ("tokens", "ce", "accuracy", "important_loss", "unimportant_loss")
#: The held-out record's group keys, left out when there are no groups (``eval.scorer`` / ``importance.scorer`` none).
EVAL_GROUP_KEYS = ("eval_important_loss", "eval_unimportant_loss", "eval_worse_group", "eval_important_accuracy",
                   "eval_unimportant_accuracy")


@dataclass
class Batch:
    """One packed micro-batch of :meth:`train.shards.ShardStream.micro_batches`, typed.

    ``seq_lens``: the packed examples' lengths, in order; ``ids``: their example ids (the tie keys);
    ``ref_loss``: the stored reference loss where the loss needs it; ``epoch``: the stream's epoch after
    it; ``empty``: the one-token padding batch of a rank out of data (nothing to train); ``source``: each
    token's index in the stream's sources (None where the batch does not say)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_lens: list[int]
    loss_mask: torch.Tensor
    score: torch.Tensor
    ref_loss: torch.Tensor | None = None
    ids: list[str] | None = None
    epoch: int = 0
    empty: bool = False
    source: torch.Tensor | None = None

    @classmethod
    def of(cls, batch: dict[str, Any]) -> Batch:
        """The typed form of a stream's micro-batch dict."""
        return cls(batch["input_ids"], batch["position_ids"], list(batch["seq_lens"]), batch["loss_mask"], batch["score"],
                   batch.get("ref_loss"), batch.get("ids"), int(batch.get("epoch", 0)), bool(batch.get("empty", False)),
                   batch.get("source"))


def empty_batch(pad_id: int) -> Batch:
    """A one-token batch with nothing to train: a rank out of data still joins ZeRO-3's collectives."""
    return Batch(torch.tensor([pad_id]), torch.tensor([0]), [1], torch.tensor([False]), torch.tensor([0.0]), None, [], empty=True)


def next_step_batches(batches: Iterator[dict[str, Any]], grad_accum: int, pad_id: int, device: torch.device) -> list[Batch] | None:
    """The ``grad_accum`` micro-batches of one optimizer step on this rank; None once every rank is out.

    A rank whose data ends first pads its step with empty batches, so every example is trained on
    exactly once per epoch even when ranks hold different numbers of micro-batches.
    """
    step: list[Batch] = []
    for _ in range(grad_accum):
        batch = next(batches, None)
        step.append(Batch.of(batch) if batch is not None else empty_batch(pad_id))
    has_data = torch.tensor([float(any(not b.empty for b in step))], device=device)
    dist.all_reduce(has_data, op=dist.ReduceOp.MAX)
    return step if has_data.item() > 0 else None


def group_masks(step: list[Batch], cfg: TrainConfig, threshold: CorpusCut | None) -> list[torch.Tensor]:
    """Important-token masks of the step's micro-batches at ``importance.rho`` in ``importance.scope`` (the batch
    scope across the step's micro-batches on every rank; ties broken by a hash of example id and position).
    ``importance.scorer=none``: no token is important."""
    if cfg.importance.scorer == NO_SCORE:
        return [torch.zeros_like(b.loss_mask, dtype=torch.bool) for b in step]
    return step_important_masks(step, cfg.importance.rho, cfg.importance.scope, threshold)


def forward_losses(module: Any, batch: Batch, cfg: TrainConfig, device: torch.device,
                   entropy_top_k: int | None = None) -> torch.Tensor:
    """Per-token CE of the batch's trainable tokens (``train.forward.token_losses``, the config's chunking); with
    ``entropy_top_k``, ``[n, 2]``: the CE and the detached normalised top-k entropy from the same chunks (eaft)."""
    # row_multiple: flex_attention pads rows to a fixed length so its kernel and BlockMask compile once.
    return token_losses(module, batch.input_ids.to(device), batch.position_ids.to(device), list(batch.seq_lens),
                        batch.loss_mask.to(device), chunk_size=cfg.train.ce_chunk, row_multiple=cfg.data.micro_batch_tokens,
                        entropy_top_k=entropy_top_k)


def run_micro_batch(engine: Any, batch: Batch, inputs: LossInputs, loss_fn: Any, step_tokens: int, progress: float,
                    cfg: TrainConfig, device: torch.device, scale: float, source_sums: torch.Tensor | None = None) -> dict[str, float]:
    """Forward, backward and (at the step's last micro-batch) optimizer step of one packed micro-batch,
    with its loss inputs (``inputs``: groups, reference losses, weights, the step's decision); its per-source CE
    sums are added into ``source_sums`` where given (:func:`train.sources.add_source_sums`)."""
    # DeepSpeed (0.19) advances ZeRO's micro-step counter in engine.forward(); we call engine.module
    # ourselves (train.forward.token_losses), so advance it here. Without this, ZeRO-3 copies each
    # micro-batch's gradient over the last one instead of accumulating: only the step's last
    # micro-batch would train (measured: step-1 grad norm = the last micro-batch's alone).
    if hasattr(engine.optimizer, "clear_backward_seen_flag"):
        engine.optimizer.clear_backward_seen_flag()
    options = dict(inputs.options)
    token_loss = forward_losses(engine.module, batch, cfg, device, loss_fn.entropy_top_k)
    if loss_fn.entropy_top_k is not None:  # eaft: the live entropy of the same logits, one pass
        token_loss, options["entropy"] = token_loss[:, 0], token_loss[:, 1]
    if source_sums is not None and batch.source is not None:
        add_source_sums(source_sums, token_loss, batch.source[batch.loss_mask], inputs.important)
    loss, metrics = loss_fn(token_loss, inputs.important, inputs.ref_loss, step_tokens, progress, **options)
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


def train_step(engine: Any, micro: list[Batch], loss_fn: Any, cfg: TrainConfig, threshold: CorpusCut | None,
               progress: float, device: torch.device, corpus_quantiles: list[float] | None = None,
               source_sums: torch.Tensor | None = None) -> tuple[list[dict[str, float]], int, int]:
    """One optimizer step over its micro-batches: returns their metrics, the step's trainable tokens
    (all ranks: every loss normalises by it) and the tokens seen (all ranks, for tokens/s). A loss
    with per-token weights (``needs_weights``) also gets the step's weight sum over all ranks.

    ``loss.group_decision=step``: a loss that decides groups (``decides_per_step``: sftgo, rho1,
    select) decides once over every micro-batch of the step on every rank before any backward; sftgo
    and rho1 (``needs_lookahead``) first compute every micro-batch's per-token losses in a no-grad
    forward with the same weights. With one micro-batch per step the per-micro-batch decision (all
    ranks) already is the step's, so nothing extra runs.

    ``source_sums`` (``[n_sources, 4]`` float64, :data:`train.sources.SOURCE_SUM_NAMES`): this rank's per-source CE
    sums and token counts of the step are added into it (no collective: the caller sums ranks), grouped by the
    load-time groups (``importance.*``)."""
    weights: list[Any] = [None] * len(micro)
    if loss_fn.needs_weights:
        weights = [loss_fn.token_weights(b.score, b.loss_mask, list(b.seq_lens), cfg.importance.scope, corpus_quantiles)
                   for b in micro]
    counts = torch.tensor([float(sum(int(b.loss_mask.sum()) for b in micro)),
                           float(sum(len(b.input_ids) for b in micro if not b.empty)),
                           float(sum(w.double().sum() for w in weights)) if loss_fn.needs_weights else 0.0],
                          device=device, dtype=torch.float64)
    dist.all_reduce(counts)
    step_tokens, seen_tokens, step_weight = int(counts[0].item()), int(counts[1].item()), float(counts[2].item())
    masks = group_masks(micro, cfg, threshold)
    inputs = [loss_inputs(b.loss_mask, m, b.ref_loss, w, step_weight, device=device) for b, m, w in zip(micro, masks, weights)]
    if cfg.loss.group_decision == "step" and loss_fn.decides_per_step and len(micro) > 1:
        ahead = None
        if loss_fn.needs_lookahead:
            # The decision needs the whole step's live losses before the first backward: a forward
            # without a graph (every rank runs one per micro-batch, as ZeRO-3's gathers require).
            with torch.no_grad():
                ahead = [forward_losses(engine.module, b, cfg, device) for b in micro]
        decisions = loss_fn.decide([x.important for x in inputs], ahead, [x.ref_loss for x in inputs])
        for x, decision in zip(inputs, decisions):
            x.options["decision"] = decision
    scale = float(dist.get_world_size() * cfg.train.grad_accum)
    parts = [run_micro_batch(engine, b, x, loss_fn, step_tokens, progress, cfg, device, scale, source_sums)
             for b, x in zip(micro, inputs)]
    return parts, step_tokens, seen_tokens


def evaluate(engine: Any, stream: ShardStream, cfg: TrainConfig, threshold: CorpusCut | None, device: torch.device,
             pad_id: int, source_names: list[str] | None = None) -> dict[str, Any]:
    """Held-out CE, per-group losses and greedy accuracies over the validation shards, grouped by
    ``train_config.eval_grouping(cfg)`` (sums all-reduced over ranks); with ``source_names`` (the stream's sources)
    also per source: ``eval_source/<key>/tokens``, ``/ce``, ``/accuracy`` and (with groups) ``/important_loss``,
    ``/unimportant_loss`` (:func:`train.heldout.source_summaries`; keys from :func:`train.sources.source_keys`)."""
    from train.heldout import GROUP_SUM_NAMES, group_loss_sums, source_summaries, summarize_group_sums

    scorer, rho, scope = train_config.eval_grouping(cfg)
    names = source_names or []
    engine.module.eval()
    # Row 0: every trainable token; row 1 + s: source s's. One all-reduce for all of them.
    sums = torch.zeros(1 + len(names), len(GROUP_SUM_NAMES), dtype=torch.float64, device=device)
    batches = stream.micro_batches(cfg.data.micro_batch_tokens)
    count = 0
    with torch.no_grad():
        while True:
            step = next_step_batches(batches, 1, pad_id, device)
            if step is None or (cfg.eval.max_batches and count >= cfg.eval.max_batches):
                break
            important = (torch.zeros_like(step[0].loss_mask, dtype=torch.bool) if scorer == NO_SCORE
                         else step_important_masks(step, rho, scope, threshold)[0])
            # An empty batch (this rank is out of data) has no source indices and no trainable token: row 0 only.
            n_sources = len(names) if step[0].source is not None else 0
            sums[: 1 + n_sources] += group_loss_sums(engine.module, step[0], important, device, chunk_size=cfg.train.ce_chunk,
                                                     row_multiple=cfg.data.micro_batch_tokens, n_sources=n_sources)
            count += 1
    dist.all_reduce(sums)
    engine.module.train()
    # The same sums -> losses as python -m evaluation.run (train/heldout.py).
    summary = summarize_group_sums(sums[0])
    record: dict[str, Any] = {
        "eval_ce": summary["ce"], "eval_important_loss": summary["important_loss"],
        "eval_unimportant_loss": summary["unimportant_loss"],
        "eval_worse_group": 1 if summary["worse_group"] == "important" else 0, "eval_tokens": summary["tokens"],
        "eval_accuracy": summary["accuracy"], "eval_important_accuracy": summary["important_accuracy"],
        "eval_unimportant_accuracy": summary["unimportant_accuracy"]}
    if scorer == NO_SCORE:  # no groups: no group numbers
        record = {key: value for key, value in record.items() if key not in EVAL_GROUP_KEYS}
    for key, item in zip(source_keys(names), source_summaries(sums[1:], names, scorer != NO_SCORE)):
        record.update({f"eval_source/{key}/{name}": item[name] for name in SOURCE_EVAL_NAMES if name in item})
    return record


@dataclass
class HeldOut:
    """data.validation's stream (its footers read once), rewound to ``start`` before every evaluation, its
    grouping's corpus cut, and its sources (None: more than :data:`train.sources.MAX_SOURCE_METRICS`, not logged)."""

    stream: ShardStream
    start: dict[str, Any]
    cut: CorpusCut | None
    sources: list[str] | None = None

    @classmethod
    def open(cls, cfg: TrainConfig, manifest: Any, val_manifest: Any) -> HeldOut | None:
        """The held-out set of ``data.validation`` (None without one), grouped by ``train_config.eval_grouping``;
        its corpus cut is the training data's when that holds the score (so "important" means what it meant in
        training), else the validation data's."""
        if val_manifest is None:
            return None
        scorer, rho, scope = train_config.eval_grouping(cfg)
        stream = ShardStream(cfg.data.validation, val_manifest, scorer, shuffle=False, epochs=1)
        cut = None
        if scope == "corpus" and scorer != NO_SCORE:
            cut_from = manifest if (manifest.score_stats.get(scorer) or {}).get("quantiles") else val_manifest
            cut = manifest_corpus_cut(cut_from, scorer, rho)
        log0("evaluation groups: none (eval.scorer / importance.scorer none)" if scorer == NO_SCORE
             else f"evaluation groups: {scorer} at rho {rho} ({scope} scope)")
        sources: list[str] | None = stream.read_sources()
        if len(sources) > MAX_SOURCE_METRICS:
            log0(f"evaluation per source: off ({len(sources)} distinct source values in {cfg.data.validation}, more than "
                 f"{MAX_SOURCE_METRICS})")
            sources = None
        return cls(stream, stream.state_dict(), cut, sources)

    def evaluate(self, engine: Any, cfg: TrainConfig, device: torch.device, pad_id: int) -> dict[str, float]:
        """:func:`evaluate` over the whole held-out set, from its start."""
        self.stream.load_state_dict(self.start)
        return evaluate(engine, self.stream, cfg, self.cut, device, pad_id, self.sources)

    def final(self, engine: Any, cfg: TrainConfig, device: torch.device, pad_id: int) -> dict[str, float]:
        """:meth:`evaluate` after the last step, its numbers logged: one line, then one per source (10 at most)."""
        from train.metrics import format_record
        from train.sources import source_lines

        record = self.evaluate(engine, cfg, device, pad_id)
        log0("final eval: " + format_record({k: v for k, v in record.items() if not k.startswith("eval_source/")}))
        for line in source_lines(record, "eval_source/", "final eval, source"):
            log0(line)
        return record
