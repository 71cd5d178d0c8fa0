"""Token groups: which trainable tokens are important (group 1) and which are not (group 0).

METHOD.md's rule: in each scope, the top ``ceil((1 - rho) * n)`` trainable tokens by score are
important, the rest unimportant; ties are broken deterministically but not by position. Scopes:

- ``sequence`` (SFT-GO's default): per example, :func:`important_mask_sequence`.
- ``batch`` (Rho-1): across the global batch: one ranking over the micro-batches given (every
  micro-batch of a step on every rank: train/grouping.py passes :func:`important_masks` its ranking
  across ranks).
- ``corpus``: one fixed cut from the manifest's quantile sketch, :func:`corpus_cut`: tokens above
  the rho-quantile ``t`` are important, tokens below are not, and tokens tied at ``t`` are split by
  the tie key (below) so that the important share is close to ``1 - rho`` even when ``t`` sits on a
  point mass (e.g. LLMLingua-2's 0 on template tokens, which made ``score >= t`` mark every token).

Tie-break, everywhere: the *tie key* :func:`tie_keys`, a number in [0, 1) that is a fixed integer mix
(splitmix64) of a stable 64-bit hash of the example id (BLAKE2b, not Python's salted ``hash()``) and
the token's position in its example. Among equal scores the smaller key wins; in the corpus scope a
tied token is important iff its key is below the cut's ``tie_fraction``. The key depends on neither
the packing, the micro-batch, the rank nor the process, so every rank, rerun, held-out evaluation,
viewer and the TRL bridge put the same tokens in the same groups, and a constant score spreads the
important tokens over the response instead of taking its first ones.

:func:`important_masks` is the one rule for every scope. Pure torch/numpy, no model, no collective:
shared by training (train/grouping.py adds the batch scope's ranking across ranks), the held-out
evaluation, the TRL bridge and the token viewer (data/shard_stats.py), so the viewer marks what
training uses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from schemas.shard import ceil_count, quantile_from_summary

SCOPES = ("sequence", "batch", "corpus")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def check_rho(rho: float) -> None:
    """ValueError unless 0 <= rho < 1."""
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho must be in [0, 1), got {rho}")


# ---------------------------------------------------------------------------------------------
# Tie keys
# ---------------------------------------------------------------------------------------------


def id_hash(example_id: str) -> int:
    """A stable unsigned 64-bit hash of an example id (BLAKE2b-64 of its UTF-8 bytes).

    Stable across processes, runs, machines and Python versions, unlike the salted builtin ``hash``.
    """
    return int.from_bytes(hashlib.blake2b(str(example_id).encode("utf-8"), digest_size=8).digest(), "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic is numpy's for uint64)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def position_keys(example_id: str | None, positions: np.ndarray | Sequence[int]) -> np.ndarray:
    """Tie keys in [0, 1) (float64) of the tokens at ``positions`` of one example.

    ``key = top 53 bits of splitmix64(id_hash(id) ^ splitmix64(position)) / 2**53``. ``example_id``
    None hashes as the empty id (callers without ids still get keys spread over positions, but the
    same pattern in every example: pass the ids).
    """
    pos = np.asarray(positions, dtype=np.uint64)
    return hashed_keys(np.full(pos.shape, id_hash("" if example_id is None else example_id), dtype=np.uint64), pos)


def hashed_keys(id_hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Vectorised tie keys from per-token id hashes (uint64, :func:`id_hash`) and positions."""
    pos = np.asarray(positions, dtype=np.uint64)
    mixed = _splitmix64(np.asarray(id_hashes, dtype=np.uint64) ^ _splitmix64(pos))
    return (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def tie_keys(ids: Sequence[str] | None, seq_lens: Sequence[int], total: int | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Tie keys of a packed micro-batch: example ``i`` (id ``ids[i]``) covers ``seq_lens[i]`` tokens.

    Args:
        ids: one id per packed example (the batch's ``ids``); None: every example hashes as the
            empty id (see :func:`position_keys`).
        seq_lens: length of each packed example, in order.
        total: length of the returned tensor (>= sum(seq_lens)); tokens past the examples
            (padding) get key 1.0, which no real key reaches.
        device: where the keys go (they are computed on the CPU).

    Returns:
        float64 ``[total]`` keys; position = index within the token's own example.
    """
    lengths = [int(n) for n in seq_lens]
    if ids is not None and len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} example ids for {len(lengths)} packed examples (seq_lens {lengths})")
    covered = sum(lengths)
    total = covered if total is None else int(total)
    if total < covered:
        raise ValueError(f"seq_lens {lengths} do not fit {total} tokens")
    keys = np.ones(total, dtype=np.float64)
    start = 0
    for i, length in enumerate(lengths):
        keys[start : start + length] = position_keys(None if ids is None else ids[i], np.arange(length))
        start += length
    return torch.from_numpy(keys).to(device) if device is not None else torch.from_numpy(keys)


# ---------------------------------------------------------------------------------------------
# Ranking scopes
# ---------------------------------------------------------------------------------------------


def top_mask(values: Tensor, k: int, keys: Tensor | None = None) -> Tensor:
    """Boolean mask of the ``k`` largest entries of the 1-D ``values``.

    Ties are broken by the smaller ``keys`` entry (the tie keys); without keys, or among equal keys,
    by the earlier index. NaN has no place in a ranking, so it raises rather than landing in an
    arbitrary group.
    """
    if values.dim() != 1:
        raise ValueError(f"top_mask expects a 1-D tensor, got shape {tuple(values.shape)}")
    if torch.isnan(values).any():
        raise ValueError("NaN among the values to rank (scores of trainable tokens must be finite or +-inf)")
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    k = max(0, min(int(k), values.numel()))
    if k == 0:
        return mask
    if keys is None:
        # An ascending stable sort of the negated values keeps equal values in index order
        # (negation is exact, unlike any epsilon trick).
        order = torch.argsort(-values.double(), stable=True)
    else:
        if keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape")
        # Sort by key first, then stably by value: equal values stay in key order.
        by_key = torch.argsort(keys.to(values.device).double(), stable=True)
        order = by_key[torch.argsort(-values.double()[by_key], stable=True)]
    mask[order[:k]] = True
    return mask


def important_mask_sequence(scores: Tensor, loss_mask: Tensor, rho: float, example_id: str | None = None,
                            keys: Tensor | None = None) -> Tensor:
    """Important tokens of ONE example: the top ``ceil((1 - rho) * n)`` of its n trainable tokens.

    Args:
        scores: ``[T]`` per-token scores (higher = more important); values at non-trainable
            positions are ignored (may be NaN, e.g. position 0 of a loss score).
        loss_mask: ``[T]`` bool, True for trainable tokens.
        rho: threshold in [0, 1); rho = 0 makes every trainable token important, rho -> 1 keeps
            at least one (the count is a ceiling).
        example_id: the example's id: ties are broken by the tie keys of (id, position). None
            hashes as the empty id (same tie pattern in every example; pass the id).
        keys: precomputed ``[T]`` tie keys instead of ``example_id`` (packed callers).

    Returns:
        ``[T]`` bool mask; non-trainable tokens are never important.
    """
    check_rho(rho)
    if scores.shape != loss_mask.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and loss_mask {tuple(loss_mask.shape)} differ in shape")
    loss_mask = loss_mask.bool()
    if keys is None:
        keys = tie_keys(None if example_id is None else [example_id], [loss_mask.numel()])
    keys = keys.reshape(-1).to(loss_mask.device)
    important = torch.zeros(loss_mask.shape, dtype=torch.bool, device=loss_mask.device)
    trainable_scores = scores[loss_mask].reshape(-1)
    k = ceil_count(1.0 - rho, trainable_scores.numel())
    important[loss_mask] = top_mask(trainable_scores, k, keys[loss_mask.reshape(-1)])
    return important


# ---------------------------------------------------------------------------------------------
# Corpus scope
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusCut:
    """The corpus scope's fixed cut: important iff ``score > threshold``, or ``score == threshold``
    and the token's tie key ``< tie_fraction``.

    ``above`` and ``tied`` are the shares of the corpus's trainable tokens strictly above and exactly
    at the threshold, as estimated from the quantile sketch; the expected important share is
    ``above + tie_fraction * tied`` (:attr:`expected_share`).
    """

    threshold: float
    tie_fraction: float = 1.0
    above: float | None = None
    tied: float = 0.0

    @property
    def expected_share(self) -> float | None:
        """The important share the cut gives over the corpus (sketch estimate), or None if unknown."""
        return None if self.above is None else self.above + self.tie_fraction * self.tied

    def __float__(self) -> float:
        return float(self.threshold)


def corpus_cut(summary: dict[str, Any], rho: float) -> CorpusCut:
    """The corpus cut at ``rho`` from a score's merged quantile sketch (``manifest.score_stats[name]``).

    Design. The threshold is the sketch's rho-quantile ``t`` (as before). The sketch holds the
    values at p = i / K (K = schemas.shard.QUANTILE_POINTS); a point mass at ``t`` shows as a run
    of (at least two) points equal to ``t``, from index ``lo`` to ``hi``. The share at or below ``t`` is then
    estimated as ``hi / K + 1 / (2K)`` and the share strictly below as ``lo / K - 1 / (2K)`` (each
    edge half-way to the next point, clipped to [0, 1]; the sketch's rank error is about 1 / K), so
    ``tied = F(t) - F(t-)`` and ``above = 1 - F(t)``. Of the tied tokens the share
    ``tie_fraction = ((1 - rho) - above) / tied`` (clipped to [0, 1]) is important, picked by the
    tie key: ``key < tie_fraction``. The keys are uniform and independent of the score, so the
    realised share is ``above + tie_fraction * tied`` = ``1 - rho`` up to the sketch's resolution
    and the sampling of ~``tied * N`` keys. With no point mass at ``t`` (``t`` between two distinct
    sketch points, or equal to one lone point) nothing is tied in the sketch: ``tie_fraction = 1``
    (the old ``>=``; a mass below 1 / K moves the share by at most that much). rho = 0
    gives ``t`` = the minimum and ``tie_fraction = 1``: every token is important.
    """
    check_rho(rho)
    quantiles = np.asarray(summary.get("quantiles") or [], dtype=np.float64)
    if quantiles.size == 0:
        raise ValueError("the summary holds no scores")
    threshold = quantile_from_summary({"quantiles": quantiles.tolist()}, rho)
    at = np.flatnonzero(quantiles == threshold)
    if quantiles.size == 1:  # a one-point sketch: every score is t
        return CorpusCut(threshold, 1.0 - rho, above=0.0, tied=1.0)
    if at.size < 2:
        # No run of equal points: no mass at t the sketch can see (< 1 / K), i.e. continuous around
        # t: the share above t is 1 - rho by definition (a lone point equal to t is one value).
        return CorpusCut(threshold, 1.0, above=1.0 - rho, tied=0.0)
    points = quantiles.size - 1
    half = 0.5 / points
    lo, hi = int(at[0]), int(at[-1])
    below = 0.0 if lo == 0 else min(1.0, lo / points - half)
    at_or_below = 1.0 if hi == points else max(0.0, hi / points + half)
    tied = max(0.0, at_or_below - below)
    above = 1.0 - at_or_below
    fraction = 1.0 if tied <= 0.0 else float(np.clip(((1.0 - rho) - above) / tied, 0.0, 1.0))
    return CorpusCut(threshold, fraction, above=above, tied=tied)


def manifest_corpus_cut(manifest: Any, score: str, rho: float) -> CorpusCut:
    """The corpus cut of ``score`` at ``rho`` from an annotated directory's manifest (its merged
    ``score_stats`` sketch; no pass over the data). The trainer's and held-out evaluation's corpus
    scope use this instead of the bare threshold."""
    check_rho(rho)
    summary = manifest.score_stats.get(score)
    if not summary or not summary.get("quantiles"):
        raise ValueError(f"manifest has no score_stats for {score!r} (has {sorted(manifest.score_stats)}); "
                         "re-annotate, or use the sequence or batch scope")
    return corpus_cut(summary, rho)


def _as_cut(threshold: float | CorpusCut) -> CorpusCut:
    return threshold if isinstance(threshold, CorpusCut) else CorpusCut(float(threshold))


def corpus_important(scores: Tensor, keys: Tensor, cut: float | CorpusCut) -> Tensor:
    """The corpus rule on 1-D trainable ``scores`` with their tie ``keys``: ``score > t``, or tied at
    ``t`` with ``key < tie_fraction``. A bare float threshold means ``tie_fraction = 1`` (``>=``).
    Compared in float64 (the sketch's values are the stored float32 scores, exactly)."""
    cut = _as_cut(cut)
    values = scores.double()
    if torch.isnan(values).any():
        raise ValueError("NaN among the scores of trainable tokens")
    tied = values == cut.threshold
    return (values > cut.threshold) | (tied & (keys.to(values.device).double() < cut.tie_fraction))


def important_masks(
    scores: Sequence[Tensor],
    loss_masks: Sequence[Tensor],
    rho: float,
    scope: str,
    cut: float | CorpusCut | None = None,
    *,
    seq_lens: Sequence[Sequence[int] | Tensor | None] | None = None,
    ids: Sequence[Sequence[str] | None] | None = None,
    keys: Sequence[Tensor] | None = None,
    rank: Callable[[Tensor, float, Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """The important tokens of packed micro-batches, in any scope: the one grouping rule.

    The trainer (one optimizer step's micro-batches, ``train.grouping.step_important_masks``), the held-out
    evaluation, the viewer (one example, ``data.shard_stats.important_masks``) and the TRL bridge (padded
    rows as examples) all call it.

    Args:
        scores, loss_masks: per micro-batch, per-token scores and the trainable tokens (bool), one shape
            each (``[T]`` or ``[B, T]``, flattened row-major).
        rho: threshold in [0, 1).
        scope: ``"sequence"``: the per-example rule (:func:`important_mask_sequence`) on each example;
            ``"batch"``: one ranking over every trainable token of every micro-batch given; ``"corpus"``:
            the fixed cut ``cut``.
        cut: the corpus cut (:func:`corpus_cut`; a bare float is ``score >= cut``); required for ``"corpus"``.
        seq_lens: per micro-batch, the packed examples' lengths in order; they partition its first
            ``sum(seq_lens)`` tokens, the rest (padding) is never important. None (or a None entry): one
            example over the whole micro-batch.
        ids: per micro-batch, its examples' ids for the tie keys (:func:`tie_keys`; None hashes every
            example as the empty id). A micro-batch without trainable tokens needs none (the trainer's
            empty padding batch has ids [] and seq_lens [1]).
        keys: per micro-batch, precomputed tie keys shaped like its scores, instead of ``ids``.
        rank: the batch scope's ranking, ``rank(values, rho, keys) -> bool mask`` over the given trainable
            tokens' scores (float64, CPU) and tie keys; default this process's top ``ceil((1 - rho) * n)``
            (:func:`top_mask`). train/grouping.py passes the ranking across data-parallel ranks (a collective:
            it is called on every rank, even with no tokens).

    Returns:
        one bool mask per micro-batch, shaped like its scores, on its ``loss_mask``'s device.
    """
    check_rho(rho)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if scope == "corpus" and cut is None:
        raise ValueError("scope 'corpus' needs the corpus threshold")
    count = len(scores)
    if len(loss_masks) != count:
        raise ValueError(f"{count} score tensors for {len(loss_masks)} loss masks")
    seq_lens, ids, keys = (list(x) if x is not None else [None] * count for x in (seq_lens, ids, keys))
    if not len(seq_lens) == len(ids) == len(keys) == count:
        raise ValueError("seq_lens, ids and keys need one entry per micro-batch")
    flat_scores, trainables, tie = [], [], []
    for score, mask, lengths, example_ids, given in zip(scores, loss_masks, seq_lens, ids, keys):
        if score.shape != mask.shape:
            raise ValueError(f"scores {tuple(score.shape)} and loss_mask {tuple(mask.shape)} differ in shape")
        trainable = mask.reshape(-1).bool().clone()
        lengths = [trainable.numel()] if lengths is None else [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
        if any(n < 0 for n in lengths) or sum(lengths) > trainable.numel():
            raise ValueError(f"seq_lens {lengths} do not fit {trainable.numel()} tokens")
        trainable[sum(lengths):] = False  # padding past the examples is never important
        if given is not None:
            tie.append(given.reshape(-1).double().to(trainable.device))
        else:  # nothing trainable (e.g. an empty padding batch): no ids needed
            tie.append(tie_keys(example_ids, lengths, trainable.numel(), device=trainable.device) if trainable.any() else None)
        flat_scores.append(score.reshape(-1))
        trainables.append((trainable, lengths))

    masks = [torch.zeros_like(trainable) for trainable, _ in trainables]
    if scope == "batch":
        values = torch.cat([s[t].detach().double().cpu() for s, (t, _) in zip(flat_scores, trainables)] or [torch.zeros(0, dtype=torch.float64)])
        value_keys = torch.cat([k[t].cpu() for k, (t, _) in zip(tie, trainables) if k is not None] or [torch.zeros(0, dtype=torch.float64)])
        if rank is None:
            top = top_mask(values, ceil_count(1.0 - rho, values.numel()), value_keys)
        else:
            top = rank(values, rho, value_keys)
        start = 0
        for important, (trainable, _) in zip(masks, trainables):
            n = int(trainable.sum())
            important[trainable] = top[start : start + n].to(trainable.device)
            start += n
    else:
        for important, score, (trainable, lengths), key in zip(masks, flat_scores, trainables, tie):
            if not trainable.any():
                continue
            if scope == "corpus":
                important[trainable] = corpus_important(score[trainable], key[trainable], cut)
                continue
            start = 0
            for length in lengths:
                end = start + length
                important[start:end] = important_mask_sequence(score[start:end], trainable[start:end], rho, keys=key[start:end])
                start = end
    return [important.reshape(score.shape) for important, score in zip(masks, scores)]


def important_mask_packed(
    scores: Tensor,
    loss_mask: Tensor,
    seq_lens: Sequence[int] | Tensor,
    rho: float,
    scope: str,
    threshold: float | CorpusCut | None = None,
    ids: Sequence[str] | None = None,
) -> Tensor:
    """Important tokens of one packed micro-batch (several examples concatenated): :func:`important_masks`
    of it alone (scope ``batch``: one ranking over its trainable tokens; ``threshold``: the corpus cut)."""
    return important_masks([scores], [loss_mask], rho, scope, threshold, seq_lens=[seq_lens], ids=[ids])[0]
