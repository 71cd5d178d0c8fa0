"""Token groups: which trainable tokens are important (group 1) and which are not (group 0).

METHOD.md's rule: in each scope, the top ``ceil((1 - rho) * n)`` trainable tokens by score are
important, the rest unimportant; ties are broken deterministically. Scopes:

- ``sequence`` (SFT-GO's default): per example, :func:`important_mask_sequence`.
- ``batch`` (Rho-1): across the global batch; one process's part is :func:`important_mask_packed`,
  every micro-batch of a step on every rank is ``train.grouping.batch_important_masks``.
- ``corpus``: one fixed threshold, the rho-quantile of all trainable-token scores of the dataset
  (``schemas.shard.quantile_from_summary(manifest.score_stats[name], rho)``); a token is important
  iff ``score >= threshold``.

Tie-break, everywhere: among equal scores the token that comes first wins, where "first" means the
earlier position in the example / packed micro-batch, then the earlier micro-batch, then the lower
rank. The rule is a pure function of the scores and their order, so every rank computes the same
groups and reruns reproduce them.

Pure torch, no model, no collective: shared by training (train/grouping.py builds the distributed
batch scope on it) and the token viewer (data/shard_stats.py), so the viewer marks what training uses.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from schemas.shard import ceil_count

SCOPES = ("sequence", "batch", "corpus")


def check_rho(rho: float) -> None:
    """ValueError unless 0 <= rho < 1."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")


def top_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest entries of the 1-D ``values``; earlier index wins ties.

    NaN has no place in a ranking, so it raises rather than landing in an arbitrary group.
    """
    if values.dim() != 1:
        raise ValueError(f"top_mask expects a 1-D tensor, got shape {tuple(values.shape)}")
    if torch.isnan(values).any():
        raise ValueError("NaN among the values to rank (scores of trainable tokens must be finite or +-inf)")
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    k = max(0, min(int(k), values.numel()))
    if k == 0:
        return mask
    # An ascending stable sort of the negated values keeps equal values in index order, so the
    # earlier index comes first among ties (negation is exact, unlike any epsilon trick).
    order = torch.argsort(-values.double(), stable=True)
    mask[order[:k]] = True
    return mask


def important_mask_sequence(scores: Tensor, loss_mask: Tensor, rho: float) -> Tensor:
    """Important tokens of ONE example: the top ``ceil((1 - rho) * n)`` of its n trainable tokens.

    Args:
        scores: ``[T]`` per-token scores (higher = more important); values at non-trainable
            positions are ignored (may be NaN, e.g. position 0 of a loss score).
        loss_mask: ``[T]`` bool, True for trainable tokens.
        rho: threshold in [0, 1); rho = 0 makes every trainable token important, rho -> 1 keeps
            at least one (the count is a ceiling).

    Returns:
        ``[T]`` bool mask; non-trainable tokens are never important. Among equal scores the
        earlier position wins.
    """
    check_rho(rho)
    if scores.shape != loss_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    loss_mask = loss_mask.bool()
    important = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    trainable_scores = scores[loss_mask]
    k = ceil_count(1.0 - rho, trainable_scores.numel())
    important[loss_mask] = top_mask(trainable_scores.reshape(-1), k)
    return important


def important_mask_packed(
    scores: Tensor,
    loss_mask: Tensor,
    seq_lens: Sequence[int] | Tensor,
    rho: float,
    scope: str,
    threshold: float | None = None,
) -> Tensor:
    """Important tokens of a packed micro-batch (several examples concatenated).

    Args:
        scores: per-token scores of any shape (``[T]`` or ``[1, T]``), flattened row-major.
        loss_mask: bool, same shape, True for trainable tokens.
        seq_lens: length of each packed example in order; they partition the first
            ``sum(seq_lens)`` flattened tokens, the rest (padding) is never important.
        rho: threshold in [0, 1).
        scope: ``"sequence"``: the per-example rule on each example; ``"batch"``: one ranking over
            every trainable token given (the trainer passes the concatenated global batch; across
            micro-batches and ranks use ``train.grouping.batch_important_masks``); ``"corpus"``: important iff
            ``score >= threshold``.
        threshold: the corpus threshold (the rho-quantile of the dataset's trainable scores);
            required for ``"corpus"``. ``>=`` (not ``>``) so that rho = 0, whose threshold is the
            minimum, makes every token important as the count rule does, and so that all tokens
            tied at the threshold fall in the same group (deterministic: a function of the score).

    Returns:
        bool mask with the shape of ``scores``.
    """
    check_rho(rho)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if scores.shape != loss_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    flat_scores = scores.reshape(-1)
    flat_mask = loss_mask.reshape(-1).bool()
    lengths = [int(n) for n in (seq_lens.tolist() if isinstance(seq_lens, Tensor) else seq_lens)]
    if any(n < 0 for n in lengths) or sum(lengths) > flat_scores.numel():
        raise ValueError(f"seq_lens {lengths} do not fit {flat_scores.numel()} tokens")
    # Tokens past the last example are padding: drop them from every scope.
    covered = torch.zeros_like(flat_mask)
    covered[: sum(lengths)] = True
    flat_mask = flat_mask & covered

    if scope == "sequence":
        important = torch.zeros_like(flat_mask)
        start = 0
        for length in lengths:
            end = start + length
            important[start:end] = important_mask_sequence(flat_scores[start:end], flat_mask[start:end], rho)
            start = end
    elif scope == "batch":
        important = important_mask_sequence(flat_scores, flat_mask, rho)
    else:
        if threshold is None:
            raise ValueError("scope 'corpus' needs the corpus threshold")
        trainable_scores = flat_scores[flat_mask]
        if torch.isnan(trainable_scores).any():
            raise ValueError("NaN among the scores of trainable tokens")
        important = torch.zeros_like(flat_mask)
        important[flat_mask] = trainable_scores >= threshold
    return important.reshape(scores.shape)
