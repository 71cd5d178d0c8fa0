"""Held-out loss per token group: the same grouping and loss code as training, for any plain model.

    manifest, threshold = open_heldout("shards/lima_val", tokenizer_sha256, "tfidf", rho=0.7, scope="sequence")
    summary = heldout_losses(model, "shards/lima_val", manifest, "tfidf", 0.7, "sequence", threshold)
    summary["ce"], summary["important_loss"], summary["unimportant_loss"], summary["worse_group"]

Two pieces are shared with the trainer's in-training evaluation (``train/step.py: evaluate``):
:func:`group_loss_sums` (one packed micro-batch -> nine float64 sums: losses, counts and greedy hits) and :func:`summarize_group_sums`
(sums -> losses). The trainer all-reduces the sums over ranks in between; :func:`heldout_losses` is the
single-process loop used by ``python -m train.evaluate`` (no DeepSpeed, no torch.distributed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from train.forward import token_losses
from train.grouping import SCOPES, CorpusCut, check_rho, manifest_corpus_cut, step_important_masks
from train.shards import ShardStream, open_annotated

__all__ = ["GROUP_SUM_NAMES", "group_loss_sums", "reduce_group_sums", "summarize_group_sums", "open_heldout", "heldout_losses"]

#: The order of the sums of :func:`group_loss_sums` (``*hits``: targets that are the greedy prediction).
GROUP_SUM_NAMES = ("ce_sum", "n", "imp_sum", "imp_n", "unimp_sum", "unimp_n", "hits", "imp_hits", "unimp_hits")


def reduce_group_sums(loss_hits: Tensor, important: Tensor) -> Tensor:
    """The float64 sums of :data:`GROUP_SUM_NAMES` from per-token ``[n, 2]`` losses and hits
    (``token_losses(..., with_hits=True)``) and the important mask over those n tokens."""
    loss, hit = loss_hits[:, 0].double(), loss_hits[:, 1].double()
    imp = important.to(loss.device)
    n = torch.tensor(float(loss.numel()), device=loss.device, dtype=torch.float64)
    return torch.stack([loss.sum(), n, loss[imp].sum(), imp.sum().double(), loss[~imp].sum(), (~imp).sum().double(),
                        hit.sum(), hit[imp].sum(), hit[~imp].sum()])


def group_loss_sums(model: nn.Module, batch: Any, important: Tensor, device: torch.device,
                    chunk_size: int = 1024, row_multiple: int | None = None) -> Tensor:
    """Per-token CE of one packed micro-batch reduced to the float64 sums of :data:`GROUP_SUM_NAMES`.

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
    return reduce_group_sums(loss_hits, important[batch.loss_mask])


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
    if scope == "corpus":
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
    Returns :func:`summarize_group_sums` plus ``examples`` and ``micro_batches``.
    """
    from tqdm import tqdm

    from train.step import Batch

    device = torch.device(device)
    stream = ShardStream(uri, manifest, scorer, rank=0, world_size=1, shuffle=False, epochs=1)
    sums = torch.zeros(len(GROUP_SUM_NAMES), dtype=torch.float64, device=device)
    examples = batches = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=stream.num_examples, desc=f"held-out {uri}", unit="ex", disable=not progress, dynamic_ncols=True)
    with torch.no_grad():
        for batch in map(Batch.of, stream.micro_batches(micro_batch_tokens)):
            important = step_important_masks([batch], rho, scope, threshold)[0]
            sums += group_loss_sums(model, batch, important, device, chunk_size)
            examples += len(batch.seq_lens)
            batches += 1
            bar.update(len(batch.seq_lens))
    bar.close()
    model.train(was_training)
    return {**summarize_group_sums(sums), "examples": examples, "micro_batches": batches}
