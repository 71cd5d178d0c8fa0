"""Held-out loss per token group: the same grouping and loss code as training, for any plain model.

    manifest, threshold = open_heldout("shards/lima_val", tokenizer_sha256, "tfidf", rho=0.7, scope="sequence")
    summary = heldout_losses(model, "shards/lima_val", manifest, "tfidf", 0.7, "sequence", threshold)
    summary["ce"], summary["important_loss"], summary["unimportant_loss"], summary["worse_group"]
    summary["sources"]   # [{"source": "lima", "tokens": ..., "ce": ..., "important_loss": ...}, ...]

Three pieces are shared with the trainer's in-training evaluation (``train/step.py: evaluate``):
:func:`group_loss_sums` (one packed micro-batch -> nine float64 sums: losses, counts and greedy hits, over all its
trainable tokens and per source), :func:`summarize_group_sums` (sums -> losses) and :func:`source_summaries`
(per-source sums -> per-source losses). The trainer all-reduces the sums over ranks in between; :func:`heldout_losses`
is the single-process loop used by ``python -m evaluation.run`` (no DeepSpeed, no torch.distributed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from train.forward import token_losses
from train.grouping import SCOPES, CorpusCut, check_rho, manifest_corpus_cut, step_important_masks
from train.shards import NO_SCORE, ShardStream, open_annotated

__all__ = ["GROUP_SUM_NAMES", "GROUP_KEYS", "group_loss_sums", "reduce_group_sums", "reduce_source_sums", "summarize_group_sums",
           "source_summaries", "open_heldout", "heldout_losses"]

#: The order of the sums of :func:`group_loss_sums` (``*hits``: targets that are the greedy prediction).
GROUP_SUM_NAMES = ("ce_sum", "n", "imp_sum", "imp_n", "unimp_sum", "unimp_n", "hits", "imp_hits", "unimp_hits")
#: :func:`summarize_group_sums`'s keys that only mean something with groups (left out when there are none).
GROUP_KEYS = ("important_loss", "unimportant_loss", "worse_group", "important_tokens", "important_accuracy", "unimportant_accuracy")


def reduce_group_sums(loss_hits: Tensor, important: Tensor) -> Tensor:
    """The float64 sums of :data:`GROUP_SUM_NAMES` from per-token ``[n, 2]`` losses and hits
    (``token_losses(..., with_hits=True)``) and the important mask over those n tokens."""
    loss, hit = loss_hits[:, 0].double(), loss_hits[:, 1].double()
    imp = important.to(loss.device)
    n = torch.tensor(float(loss.numel()), device=loss.device, dtype=torch.float64)
    return torch.stack([loss.sum(), n, loss[imp].sum(), imp.sum().double(), loss[~imp].sum(), (~imp).sum().double(),
                        hit.sum(), hit[imp].sum(), hit[~imp].sum()])


def reduce_source_sums(loss_hits: Tensor, important: Tensor, source: Tensor, n_sources: int) -> Tensor:
    """:func:`reduce_group_sums` per source: ``[n_sources, 9]``, row ``s`` the sums over the tokens whose ``source``
    index is ``s`` (a source without tokens here: zeros)."""
    loss, hit = loss_hits[:, 0].double(), loss_hits[:, 1].double()
    imp = important.to(loss.device, torch.float64)
    un = 1.0 - imp
    values = torch.stack([loss, torch.ones_like(loss), loss * imp, imp, loss * un, un, hit, hit * imp, hit * un], 1)
    sums = torch.zeros(n_sources, len(GROUP_SUM_NAMES), dtype=torch.float64, device=loss.device)
    return sums.index_add_(0, source.to(loss.device, torch.long), values)


def group_loss_sums(model: nn.Module, batch: Any, important: Tensor, device: torch.device,
                    chunk_size: int = 1024, row_multiple: int | None = None, n_sources: int = 0) -> Tensor:
    """Per-token CE of one packed micro-batch reduced to the float64 sums of :data:`GROUP_SUM_NAMES`: ``[1 + n_sources,
    9]``, row 0 over all its trainable tokens, row ``1 + s`` over those of source ``s`` (:func:`reduce_source_sums`;
    ``batch.source`` gives each token's; with ``n_sources`` 0 only row 0).

    Args:
        model: a ``*ForCausalLM`` (or the module inside a DeepSpeed engine); called without autograd
            by the callers (``torch.no_grad``).
        batch: a micro-batch (``train.step.Batch``).
        important: bool mask over the batch's tokens (``batch.loss_mask``'s shape), from the grouping code.
        device: where the model runs.
        chunk_size: target tokens per lm_head + cross-entropy chunk (``train.ce_chunk``).
        row_multiple: flex_attention pads the row to a multiple of this (the packing budget).
    """
    mask = batch.loss_mask.to(device)
    loss_hits = token_losses(model, batch.input_ids.to(device), batch.position_ids.to(device),
                             list(batch.seq_lens), mask, chunk_size=chunk_size, row_multiple=row_multiple, with_hits=True)
    imp = important[batch.loss_mask]
    overall = reduce_group_sums(loss_hits, imp)[None]
    if not n_sources:
        return overall
    if batch.source is None:
        raise ValueError("per-source sums need the batch's per-token source indices (batch.source)")
    return torch.cat([overall, reduce_source_sums(loss_hits, imp, batch.source[batch.loss_mask], n_sources)])


def summarize_group_sums(sums: Tensor) -> dict[str, Any]:
    """Mean CE over all trainable tokens and over each group, from (possibly all-reduced) sums.

    Returns ``ce``, ``important_loss``, ``unimportant_loss`` (0.0 for an empty group, as the trainer
    logs it), ``worse_group`` (``"important"`` when its loss is >= the other's, ties included, as the
    trainer's ``eval_worse_group`` = 1), ``tokens``, ``important_tokens``, and the greedy accuracy under
    teacher forcing over all trainable tokens and each group (``accuracy``, ``important_accuracy``,
    ``unimportant_accuracy``; 0.0 for an empty group).
    """
    ce_sum, n, imp_sum, imp_n, un_sum, un_n, hits, imp_hits, un_hits = sums.tolist()
    imp_loss = imp_sum / imp_n if imp_n else 0.0
    un_loss = un_sum / un_n if un_n else 0.0
    return {"ce": ce_sum / n if n else 0.0, "important_loss": imp_loss, "unimportant_loss": un_loss,
            "worse_group": "important" if imp_loss >= un_loss else "unimportant",
            "tokens": int(round(n)), "important_tokens": int(round(imp_n)), "accuracy": hits / n if n else 0.0,
            "important_accuracy": imp_hits / imp_n if imp_n else 0.0, "unimportant_accuracy": un_hits / un_n if un_n else 0.0}


def source_summaries(sums: Tensor, names: list[str], groups: bool) -> list[dict[str, Any]]:
    """Per-source held-out numbers from ``[n_sources, 9]`` (possibly all-reduced) sums, one dict per source in order:
    ``source`` (its name), ``tokens``, and where that source has trainable tokens ``ce`` and ``accuracy``; with
    ``groups``, ``important_tokens`` and each non-empty group's ``important_loss`` / ``unimportant_loss`` (a mean over
    no token is left out, not given as 0)."""
    out = []
    for name, row in zip(names, sums):
        summary = summarize_group_sums(row)
        item: dict[str, Any] = {"source": name, "tokens": summary["tokens"]}
        if summary["tokens"]:
            item.update(ce=summary["ce"], accuracy=summary["accuracy"])
        if groups:
            item["important_tokens"] = summary["important_tokens"]
            if summary["important_tokens"]:
                item["important_loss"] = summary["important_loss"]
            if summary["tokens"] - summary["important_tokens"]:
                item["unimportant_loss"] = summary["unimportant_loss"]
        out.append(item)
    return out


def open_heldout(uri: str, tokenizer_sha256: str | None, scorer: str, rho: float, scope: str) -> tuple[Any, CorpusCut | None]:
    """Check an annotated directory for a held-out evaluation; return its manifest and corpus cut
    (threshold and tie fraction, :func:`train.grouping.manifest_corpus_cut`; None outside scope corpus).

    Raises ``ValueError`` (naming the directory) on a tokenizer fingerprint mismatch, a broken
    directory, a scorer it does not hold, a scope unknown or (``corpus``) without score statistics,
    and rho outside [0, 1). No model is needed.
    """
    check_rho(rho)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {list(SCOPES)}")
    manifest = open_annotated(uri, tokenizer_sha256, scorer, option="--scorer")
    threshold = None
    if scope == "corpus" and scorer != NO_SCORE:
        try:
            threshold = manifest_corpus_cut(manifest, scorer, rho)
        except ValueError as exc:
            raise ValueError(f"{uri}: {exc}") from None
    return manifest, threshold


def heldout_losses(model: nn.Module, uri: str, manifest: Any, scorer: str, rho: float, scope: str,
                   threshold: float | CorpusCut | None, micro_batch_tokens: int = 4096, device: torch.device | str = "cpu",
                   chunk_size: int = 1024, progress: bool = True) -> dict[str, Any]:
    """Held-out CE and per-group losses of ``model`` over a whole annotated directory, in file order.

    Packs with ``ShardStream.micro_batches(micro_batch_tokens)`` like the trainer and groups each micro-batch
    on its own, as the trainer's evaluation does (one micro-batch per step: scope ``batch`` ranks the
    micro-batch, so it depends on the packing: use the training run's ``data.micro_batch_tokens`` to
    reproduce its groups).
    Returns :func:`summarize_group_sums` (without :data:`GROUP_KEYS` for scorer ``none``: no groups) plus ``examples``,
    ``micro_batches`` and ``sources`` (:func:`source_summaries` over the directory's sources, sorted by name).
    """
    from tqdm import tqdm

    from train.step import Batch

    device = torch.device(device)
    stream = ShardStream(uri, manifest, scorer, rank=0, world_size=1, shuffle=False, epochs=1)
    names = stream.read_sources()
    sums = torch.zeros(1 + len(names), len(GROUP_SUM_NAMES), dtype=torch.float64, device=device)
    examples = batches = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=stream.num_examples, desc=f"held-out {uri}", unit="ex", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for batch in map(Batch.of, stream.micro_batches(micro_batch_tokens)):
            important = (torch.zeros_like(batch.loss_mask, dtype=torch.bool) if scorer == NO_SCORE  # no groups
                         else step_important_masks([batch], rho, scope, threshold)[0])
            sums += group_loss_sums(model, batch, important, device, chunk_size, n_sources=len(names))
            examples += len(batch.seq_lens)
            batches += 1
            bar.update(len(batch.seq_lens))
    bar.close()
    model.train(was_training)
    groups = scorer != NO_SCORE
    summary = {key: value for key, value in summarize_group_sums(sums[0]).items() if groups or key not in GROUP_KEYS}
    return {**summary, "examples": examples, "micro_batches": batches, "sources": source_summaries(sums[1:], names, groups)}
