"""Annotated shards for training: open and check, stream row group by row group, pack without padding.

    manifest = open_annotated(uri, tokenizer_sha256, score="tfidf")
    stream = ShardStream(uri, manifest, "tfidf", seed=0)          # rank / world_size from torch.distributed
    for batch in stream.micro_batches(max_tokens=8192, num_workers=2):
        ...                                                        # one micro-batch: dict of tensors
        checkpoint["data"] = stream.state_dict()                   # exact position, between any two batches

Order of one epoch (nanoGPT / nanochat's rank-sharded Parquet row-group stream, made exact):
the (shard, row group) units are shuffled with a generator seeded by (seed, epoch) and the rows of each
unit by (seed, epoch, shard, row group). The concatenation is the epoch's *global* example order. It is
cut by example, not by unit, into ``world_size`` contiguous blocks, and each rank's block into one
contiguous sub-block per DataLoader worker ("role"): of equal example counts (sizes differ by at most
one), or with ``balance_tokens`` of about equal tokens (trainable examples' lengths, read once from the
``loss_mask`` column: :meth:`ShardStream.plan`), so ranks finish an epoch together. So every example is
seen exactly once per epoch however the units divide, and a worker reads only the row groups that
overlap its sub-block (one row group in memory at a time), never the whole dataset.

Position: per role ``{epoch, cursor}`` (cursor = examples of the role's sub-block consumed, skipped
ones included) plus the role the next item comes from. Every yielded item carries its role's position
after it; the main process records the position of each item it hands out, so ``state_dict()`` is the
position after the last item the caller received, whatever the workers have prefetched. On resume,
worker ``w`` plays role ``(next_role + w) % num_workers``: the DataLoader's round-robin over workers
(skipping exhausted ones) then continues exactly where the interrupted run stopped.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.grouping import check_rho
from schemas.shard import (
    BASE_LOSS,
    EXCESS_LOSS,
    ID,
    INPUT_IDS,
    LOSS_MASK,
    MANIFEST_NAME,
    REF_LOSS,
    SOURCE,
    Manifest,
    first_non_finite,
    has_ref_loss,
    has_score,
    join,
    sidecar_name,
    quantile_from_summary,
    score_column,
    score_names,
)
from schemas.validate import check_directory

STATE_VERSION = 2  # 2: blocks may be balanced by tokens (balance_tokens), per epoch
# importance.scorer's value for a loss that reads no stored score (sft, infosft, dft, eaft): no score column is
# read, every example's ``score`` is 0 and no token is important (the trainer logs no group numbers).
NO_SCORE = "none"

__all__ = ["NO_SCORE", "open_annotated", "corpus_threshold", "pack", "pack_count", "balanced_cuts", "ShardStream", "StreamPlan", "STATE_VERSION"]


# ---------------------------------------------------------------------------------------------
# Opening and checking an annotated directory
# ---------------------------------------------------------------------------------------------


def open_annotated(uri: str, tokenizer_sha256: str | None, score: str, *, deep: bool = False,
                   option: str = "importance.scorer") -> Manifest:
    """Check an annotated directory for training on ``score`` and return its manifest.

    Args:
        uri: a local directory, or an fsspec URI (``file://``, ``s3://``, ``gs://`` ...).
        tokenizer_sha256: the model tokenizer's fingerprint (schemas.tokenizer_fingerprint); None skips
            the check (tests, or a deliberate override).
        score: a stored scorer's name (``tfidf``, ``ref_loss`` ...) or ``excess_loss`` when both
            ``base_loss`` and ``ref_loss`` are stored; :data:`NO_SCORE` asks for none.
        option: the option that named ``score``, for the error message (``--scorer`` in evaluation.run).
        deep: also read every byte (checksums, list lengths, finite scores, unique ids). Off by
            default: it reads the whole dataset once; the stream still refuses a NaN score it meets.

    Raises:
        ShardValidationError: the directory breaks the shard contract (each problem names its file),
            including a tokenizer fingerprint mismatch.
        ValueError: ``score`` is not available, or the dataset holds no rows / no trainable token.
    """
    uri = str(uri)
    manifest = check_directory(uri, deep=deep, tokenizer_sha256=tokenizer_sha256)  # local path or fsspec URI
    where = join(uri, sidecar_name(MANIFEST_NAME, manifest.schema_version))
    if score != NO_SCORE and not has_score(manifest, score):
        available = score_names(manifest.scorer_names)
        hint = ""
        if score == EXCESS_LOSS:
            hint = f"; {EXCESS_LOSS} needs both {BASE_LOSS} and {REF_LOSS} annotated"
        elif score.startswith("score_"):
            hint = f"; name the scorer, not its column (e.g. {score[len('score_'):]!r})"
        raise ValueError(f"{where}: score {score!r} ({option}) is not in this directory; it offers {available}{hint}")
    rows = sum(entry.rows for entry in manifest.shards)
    if rows == 0:
        raise ValueError(f"{where}: empty dataset (0 rows in {len(manifest.shards)} shards); nothing to train on")
    if sum(entry.trainable_tokens for entry in manifest.shards) == 0:
        raise ValueError(f"{where}: {rows} rows but no trainable token (every loss_mask is false)")
    return manifest


def corpus_threshold(manifest: Manifest, score: str, rho: float) -> float:
    """The "corpus" scope's fixed threshold: the rho-quantile of all trainable-token scores.

    Read from the manifest's merged quantile sketch, so it costs no pass over the data.
    """
    check_rho(rho)
    summary = manifest.score_stats.get(score)
    if not summary:
        raise ValueError(f"manifest has no score_stats for {score!r} (has {sorted(manifest.score_stats)}); "
                         "re-annotate, or use the sequence or batch scope")
    return quantile_from_summary(summary, rho)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def _collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate examples into one padding-free micro-batch."""

    def cat(key: str, dtype: torch.dtype) -> torch.Tensor:
        # One numpy concatenation (a fresh, writable array), then one tensor: no per-example tensors.
        return torch.from_numpy(np.concatenate([np.asarray(ex[key]) for ex in examples])).to(dtype)

    seq_lens = [int(len(ex[INPUT_IDS])) for ex in examples]
    refs = [ex.get("ref_loss") for ex in examples]
    sources = [ex.get("source") for ex in examples]
    batch: dict[str, Any] = {
        INPUT_IDS: cat(INPUT_IDS, torch.long),
        # Restart at 0 per example: with position_ids, attention kernels (FlashAttention varlen,
        # FlexAttention, HF's packed-sequence path) keep examples from attending to each other.
        "position_ids": torch.cat([torch.arange(n, dtype=torch.long) for n in seq_lens]),
        "seq_lens": seq_lens,
        LOSS_MASK: cat(LOSS_MASK, torch.bool),
        "score": cat("score", torch.float32),
        "ref_loss": None if any(r is None for r in refs) else cat("ref_loss", torch.float32),
        "ids": [str(ex["id"]) for ex in examples],
        # Per token, the index of its example's source in the stream's sources (per-source metrics).
        "source": None if any(x is None for x in sources) else
        torch.from_numpy(np.repeat(np.asarray(sources, dtype=np.int64), seq_lens)),
    }
    last = examples[-1]
    if "position" in last:  # the stream's resume point after this micro-batch
        batch["epoch"] = last["position"]["epoch"]
        batch["position"] = dict(last["position"])
    return batch


def pack(examples_iter: Iterable[dict[str, Any]], max_tokens: int) -> Iterator[dict[str, Any]]:
    """Greedily concatenate consecutive examples into micro-batches of at most ``max_tokens`` tokens.

    Order-preserving (no bin packing), so a micro-batch ends after a known example and the stream's
    position after it is exact. An example longer than ``max_tokens`` becomes a micro-batch of its
    own (annotate already truncated it to the model's context, so it fits the model; the budget is
    a memory target, not a hard limit).

    Each example: a dict with ``id``, ``input_ids``, ``loss_mask``, ``score`` and optionally
    ``ref_loss`` (numpy arrays or tensors, equal lengths), ``source`` (an int: its index in
    :attr:`ShardStream.sources`) and ``position``. Each micro-batch:
    ``input_ids`` [T] long, ``position_ids`` [T] long (0 at each example's start), ``seq_lens``
    list[int], ``loss_mask`` [T] bool, ``score`` [T] float32, ``ref_loss`` [T] float32 or None,
    ``ids`` list[str], ``source`` [T] long (each token's example's source index) or None when an
    example has none, and ``epoch`` / ``position`` of its last example when the examples carry one.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    buffer: list[dict[str, Any]] = []
    used = 0
    for example in examples_iter:
        n = len(example[INPUT_IDS])
        if buffer and used + n > max_tokens:
            yield _collate(buffer)
            buffer, used = [], 0
        buffer.append(example)
        used += n
        if used >= max_tokens:  # full, or one over-long example alone: emit now rather than wait
            yield _collate(buffer)
            buffer, used = [], 0
    if buffer:
        yield _collate(buffer)


def pack_count(lengths: Iterable[int], max_tokens: int) -> int:
    """How many micro-batches :func:`pack` makes of examples of these lengths, in this order (its rule, no data)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    count, used = 0, 0
    for n in lengths:
        if used and used + n > max_tokens:
            count, used = count + 1, 0
        used += n
        if used >= max_tokens:
            count, used = count + 1, 0
    return count + (1 if used else 0)


def balanced_cuts(weights: np.ndarray, parts: int) -> np.ndarray:
    """``parts + 1`` cut points cutting ``weights`` (in order) into contiguous parts of about equal sum.

    Part ``k`` is ``weights[cuts[k]:cuts[k + 1]]``: an item belongs to the part in which its cumulative
    sum (itself included) falls, so each part's sum is within one item of ``sum / parts``. All-zero
    weights fall back to equal item counts.
    """
    n = len(weights)
    cumulative = np.cumsum(weights, dtype=np.float64)
    total = float(cumulative[-1]) if n else 0.0
    if total <= 0:
        return np.array([k * n // parts for k in range(parts + 1)], dtype=np.int64)
    inner = np.searchsorted(cumulative, total * np.arange(1, parts) / parts, side="right")
    return np.concatenate([[0], inner, [n]]).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def _split(n: int, parts: int, index: int) -> tuple[int, int]:
    """Bounds of part ``index`` of ``n`` items cut into ``parts`` contiguous parts (sizes differ by <= 1)."""
    return index * n // parts, (index + 1) * n // parts


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, flat values) of a list column, without a Python object per row."""
    array = table.column(name).combine_chunks()
    if isinstance(array, pa.ChunkedArray):  # older pyarrow returns a ChunkedArray here
        array = pa.concat_arrays(array.chunks)
    offsets = array.offsets.to_numpy().astype(np.int64)
    # flatten() honours a slice's offset (.values would not), so the offsets are rebased to match.
    return offsets - offsets[0], array.flatten().to_numpy(zero_copy_only=False)


@dataclass
class StreamPlan:
    """What one epoch of a stream holds, and how many micro-batches each rank packs per epoch (ShardStream.plan)."""

    micro_batches: list[list[int]]  # [rank][epoch]
    examples: int  # trained per epoch: the examples with a trainable token
    tokens: int  # their tokens
    trainable_tokens: int  # their trainable tokens (position 0 never is)
    skipped: int  # examples without a trainable token: never trained
    loss_mask_tokens: int  # true values of the loss_mask column (the manifest's trainable_tokens)

    def steps(self, grad_accum: int) -> int:
        """Optimizer steps of all the planned epochs: the busiest rank's micro-batches over ``grad_accum``."""
        return max(-(-sum(per_epoch) // grad_accum) for per_epoch in self.micro_batches)


class ShardStream(IterableDataset):
    """Examples or packed micro-batches of an annotated directory, sharded, shuffled and resumable.

    Args:
        uri: the directory or fsspec URI given to :func:`open_annotated`.
        manifest: what :func:`open_annotated` returned (the stream trusts it: open first).
        score: scorer name, or ``excess_loss`` (= base_loss - ref_loss, computed here per token), or
            :data:`NO_SCORE` (no score column is read; every ``score`` is 0).
        rank, world_size: data-parallel position; None takes them from torch.distributed when it is
            initialized, else 0 and 1.
        seed: the shuffle seed; epoch ``e``'s order depends only on (seed, e).
        shuffle: False keeps file order (shard, row group, row) every epoch.
        with_ref_loss: also return the stored ``ref_loss`` per token (Rho-1's online form).
        epochs: number of epochs to yield (counted from epoch 0); None = endless, the trainer stops.
        max_tokens: when set, iterating yields packed micro-batches (see :func:`pack`).
        balance_tokens: cut each epoch's order into ranks' and roles' blocks of about equal tokens
            (trainable examples' lengths, read from the ``loss_mask`` column at construction) rather
            than equal example counts: ranks then run out of data together (the trainer's choice).

    Iterating yields, per example: ``id``, ``input_ids`` long, ``loss_mask`` bool, ``score``
    float32, ``ref_loss`` float32 or None, ``source`` (int: the index of its ``source`` value in
    :attr:`sources`, the directory's distinct values sorted), ``epoch``, ``position``. The first token's loss_mask is
    always false: position 0 predicts nothing (METHOD.md), whatever the shard says. Examples with no
    trainable token left are skipped and counted in :attr:`skipped_no_trainable`.

    With ``DataLoader(stream, num_workers=n)`` the main process must call :meth:`record` on each
    item and drop items marked ``end_of_stream`` (position only: skipped examples after a worker's
    last item, at the end of a finite stream); :meth:`micro_batches` and :meth:`examples` do both.
    """

    def __init__(
        self,
        uri: str,
        manifest: Manifest,
        score: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        with_ref_loss: bool = False,
        epochs: int | None = None,
        max_tokens: int | None = None,
        balance_tokens: bool = False,
    ) -> None:
        super().__init__()
        if rank is None or world_size is None:
            initialized = dist.is_available() and dist.is_initialized()
            rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
            world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if score != NO_SCORE and not has_score(manifest, score):
            raise ValueError(f"score {score!r} is not in the manifest (offers {score_names(manifest.scorer_names)})")
        if with_ref_loss and not has_ref_loss(manifest):
            raise ValueError(f"with_ref_loss needs a {score_column(REF_LOSS)!r} column; the manifest has scorers {manifest.scorer_names}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.uri, self.manifest, self.score = str(uri), manifest, score
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.with_ref_loss, self.epochs, self.max_tokens = with_ref_loss, epochs, max_tokens
        self.balance_tokens = balance_tokens
        self._fs, self._root = fsspec.core.url_to_fs(self.uri)

        # Only these columns are ever read, never another scorer's: `source` (a few distinct strings, dictionary-
        # encoded) for the per-source metrics.
        self._score_columns = (
            [score_column(BASE_LOSS), score_column(REF_LOSS)] if score == EXCESS_LOSS
            else [] if score == NO_SCORE else [score_column(score)]
        )
        self.columns: list[str] = [ID, INPUT_IDS, LOSS_MASK, SOURCE, *self._score_columns]
        if with_ref_loss and score_column(REF_LOSS) not in self.columns:
            self.columns.append(score_column(REF_LOSS))

        # Units from the footers (metadata only): (shard index, row group index, rows).
        self.units: list[tuple[int, int, int]] = []
        for index, entry in enumerate(manifest.shards):
            with self._open(index) as parquet:
                for group in range(parquet.metadata.num_row_groups):
                    rows = parquet.metadata.row_group(group).num_rows
                    if rows:
                        self.units.append((index, group, rows))
        self.num_examples = sum(rows for _, _, rows in self.units)
        self._unit_starts = np.concatenate([[0], np.cumsum([rows for _, _, rows in self.units])]).astype(np.int64)
        # Per example (unit order): tokens and trainable tokens (position 0 excluded), once read_lengths() ran.
        self.lengths: np.ndarray | None = None
        self.trainable: np.ndarray | None = None
        self.loss_mask_tokens = 0
        # The distinct values of the `source` column, sorted, once read_lengths() or read_sources() ran.
        self.sources: list[str] | None = None
        self._bounds_cache: dict[tuple[int, int, int], tuple[int, int]] = {}

        # Position (main process): see the module docstring.
        self._num_roles: int | None = None
        self._roles: list[dict[str, int]] = []
        self._next_role = 0
        self._handle: tuple[int, Any] | None = None  # (shard index, open ParquetFile) of this process
        if balance_tokens:
            self.read_lengths()

    # --- files -------------------------------------------------------------------------------

    def _shard_uri(self, index: int) -> str:
        return join(self.uri, self.manifest.shards[index].path)

    def _open(self, index: int) -> pq.ParquetFile:
        """Open shard ``index``: local files directly, others through fsspec (ParquetFile owns the handle)."""
        path = join(self._root, self.manifest.shards[index].path)
        try:
            if isinstance(self._fs, LocalFileSystem):
                return pq.ParquetFile(path)
            return pq.ParquetFile(path, filesystem=PyFileSystem(FSSpecHandler(self._fs)))
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{self._shard_uri(index)}: not a readable Parquet file ({exc})") from exc

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # open files stay in their process; a worker opens its own
        return state

    def _read_unit(self, shard: int, group: int, columns: list[str] | None = None) -> pa.Table:
        """One row group, only :attr:`columns` (or ``columns``); keeps the shard open for its next row group."""
        if self._handle is None or self._handle[0] != shard:
            if self._handle is not None:
                self._handle[1].close()
            self._handle = (shard, self._open(shard))
        try:
            return self._handle[1].read_row_group(group, columns=columns or self.columns)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"{self._shard_uri(shard)}: row group {group} is corrupt ({exc})") from exc

    # --- order -------------------------------------------------------------------------------

    def _unit_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.units))
        # The trailing tag keeps this stream apart from the row generators' (SeedSequence pads with 0).
        return np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.units))

    def _row_order(self, epoch: int, unit: int) -> np.ndarray:
        shard, group, rows = self.units[unit]
        if not self.shuffle:
            return np.arange(rows)
        # Seeded by the unit itself, so a worker that reads only this unit needs no other state.
        return np.random.default_rng([self.seed, epoch, 1, shard, group]).permutation(rows)

    def epoch_order(self, epoch: int) -> list[tuple[int, int, int]]:
        """The epoch's global example order as (shard, row group, row) — for tests and debugging."""
        return [(self.units[u][0], self.units[u][1], int(r)) for u in self._unit_order(epoch) for r in self._row_order(epoch, u)]

    def read_sources(self) -> list[str]:
        """The distinct values of the ``source`` column over the whole directory, sorted (:attr:`sources`): the same
        on every rank and across a resume (the same data), whatever order the examples come in. Reads that column
        only, unless :meth:`read_lengths` already read it."""
        if self.sources is None:
            found: set[str] = set()
            for shard, group, _ in self.units:
                found.update(self._unit_sources(self._read_unit(shard, group, columns=[SOURCE])))
            self._close()
            self.sources = sorted(found)
        return self.sources

    def _unit_sources(self, table: pa.Table) -> list[str]:
        return pc.unique(table.column(SOURCE)).to_pylist()

    def _close(self) -> None:
        if self._handle is not None:
            self._handle[1].close()
            self._handle = None

    def read_lengths(self) -> None:
        """Read every example's length and trainable-token count (the ``loss_mask`` column: bit-packed booleans, no
        token ids or scores) into :attr:`lengths` and :attr:`trainable`, in unit order; and, in the same reads, the
        ``source`` column's distinct values (:attr:`sources`, see :meth:`read_sources`)."""
        if self.lengths is not None:
            return
        lengths, trainable = [], []
        raw_total = 0
        found: set[str] = set()
        for shard, group, _ in self.units:
            table = self._read_unit(shard, group, columns=[LOSS_MASK, SOURCE])
            found.update(self._unit_sources(table))
            offsets, values = _list_column(table, LOSS_MASK)
            values = values.astype(np.int64, copy=False)
            starts, ends = offsets[:-1], offsets[1:]
            summed = np.concatenate([[0], np.cumsum(values)])
            first = np.zeros(len(starts), np.int64)
            nonempty = ends > starts
            first[nonempty] = values[starts[nonempty]]
            raw_total += int(values.sum())
            lengths.append(ends - starts)
            trainable.append(summed[ends] - summed[starts] - first)  # position 0 predicts nothing (see _examples_of)
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        self.trainable = np.concatenate(trainable).astype(np.int64) if trainable else np.zeros(0, np.int64)
        self.loss_mask_tokens = raw_total  # the column's true values, position 0 included (the manifest's count)
        self.sources = sorted(found) if self.sources is None else self.sources
        self._close()

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        """The epoch's global order as indices into :attr:`lengths` (unit order)."""
        parts = [self._unit_starts[u] + self._row_order(epoch, u) for u in self._unit_order(epoch)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _bounds(self, epoch: int, rank: int, role: int, num_roles: int) -> tuple[int, int]:
        """Global positions [start, stop) of ``rank``'s role ``role`` in epoch ``epoch``'s order."""
        if not self.balance_tokens:  # equal example counts: the same positions every epoch
            lo, hi = _split(self.num_examples, self.world_size, rank)
            a, b = _split(hi - lo, num_roles, role)
            return lo + a, lo + b
        key = (epoch, rank, num_roles)
        if key not in self._bounds_cache:
            order = self._epoch_indices(epoch)
            weight = np.where(self.trainable[order] > 0, self.lengths[order], 0)  # skipped examples weigh nothing
            ranks = balanced_cuts(weight, self.world_size)
            lo, hi = int(ranks[rank]), int(ranks[rank + 1])
            roles = balanced_cuts(weight[lo:hi], num_roles)
            if len(self._bounds_cache) > 64:
                self._bounds_cache.clear()
            self._bounds_cache[key] = (lo, hi, roles)  # type: ignore[assignment]
        lo, hi, roles = self._bounds_cache[key]  # type: ignore[misc]
        return lo + int(roles[role]), lo + int(roles[role + 1])

    def _block(self, role: int, num_roles: int, epoch: int = 0) -> tuple[int, int]:
        """Global positions [start, stop) of this rank's role ``role`` in epoch ``epoch``'s order."""
        return self._bounds(epoch, self.rank, role, num_roles)

    def plan(self, max_tokens: int, num_roles: int = 1, epochs: int = 1) -> "StreamPlan":
        """What ``epochs`` epochs hold and how every rank packs them (a dry pack: lengths only, no tokens).

        ``micro_batches[r][e]``: micro-batches rank ``r`` packs in epoch ``e`` (its roles' counts summed;
        each role packs each epoch apart, as iteration does). The trainer's steps follow from it exactly.
        """
        self.read_lengths()
        assert self.lengths is not None and self.trainable is not None
        per_rank: list[list[int]] = [[0] * epochs for _ in range(self.world_size)]
        for epoch in range(epochs):
            order = self._epoch_indices(epoch)
            for rank in range(self.world_size):
                for role in range(num_roles):
                    start, stop = self._bounds(epoch, rank, role, num_roles)
                    picked = order[start:stop]
                    picked = picked[self.trainable[picked] > 0]
                    per_rank[rank][epoch] += pack_count(self.lengths[picked].tolist(), max_tokens)
        kept = self.trainable > 0
        return StreamPlan(micro_batches=per_rank, examples=int(kept.sum()), tokens=int(self.lengths[kept].sum()),
                          trainable_tokens=int(self.trainable.sum()), skipped=int((~kept).sum()),
                          loss_mask_tokens=self.loss_mask_tokens)

    def _epoch_rows(self, epoch: int, start: int, stop: int) -> Iterator[dict[str, Any]]:
        """Examples at global positions [start, stop) of epoch ``epoch``, reading only overlapping units."""
        offset = 0
        for unit in self._unit_order(epoch):
            shard, group, rows = self.units[unit]
            lo, hi = max(start - offset, 0), min(stop - offset, rows)
            offset += rows
            if lo >= hi:
                if offset >= stop:
                    break
                continue
            picked = self._row_order(epoch, unit)[lo:hi]
            yield from self._examples_of(self._read_unit(shard, group), picked, shard, group)
            if offset >= stop:
                break

    def _examples_of(self, table: pa.Table, rows: np.ndarray, shard: int, group: int) -> Iterator[dict[str, Any]]:
        ids = table.column(ID).to_pylist()
        source = pc.index_in(table.column(SOURCE), value_set=pa.array(self.read_sources(), pa.string()))
        if source.null_count:  # the directory changed under the stream (its sources were read at the start)
            row = int(np.flatnonzero(source.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"{self._shard_uri(shard)}: row group {group}, row {row} (id {ids[row]}): source "
                             f"{table.column(SOURCE)[row].as_py()!r} was not in the directory when the stream opened")
        source_index = source.to_numpy().astype(np.int64)
        offsets, input_ids = _list_column(table, INPUT_IDS)
        columns = {name: _list_column(table, name) for name in self.columns if name not in (ID, INPUT_IDS, SOURCE)}
        for name, (other, _) in columns.items():
            # Quick validation reads footers only; a cheap check here keeps tokens and scores aligned.
            if not np.array_equal(other, offsets):
                raise ValueError(f"{self._shard_uri(shard)}: row group {group}: {name} lengths differ from input_ids")
        base = {name: values for name, (_, values) in columns.items()}
        if self.score == EXCESS_LOSS:
            score = base[score_column(BASE_LOSS)].astype(np.float32) - base[score_column(REF_LOSS)].astype(np.float32)
        elif self.score == NO_SCORE:
            score = np.zeros(len(input_ids), dtype=np.float32)
        else:
            score = base[score_column(self.score)].astype(np.float32, copy=False)
        ref = base.get(score_column(REF_LOSS)) if self.with_ref_loss else None
        for name, values in ((self.score, score), (REF_LOSS, ref)):
            # The whole row group: caught whichever rows this role takes.
            row = None if values is None else first_non_finite(values, offsets)
            if row is not None:
                raise ValueError(f"{self._shard_uri(shard)}: row group {group}, row {row} (id {ids[row]}): "
                                 f"{name} holds NaN or infinite values; run python -m schemas.validate on it")
        mask_values = base[LOSS_MASK].astype(bool, copy=False)
        for row in rows:
            s, e = int(offsets[row]), int(offsets[row + 1])
            mask = mask_values[s:e].copy()
            mask[:1] = False  # position 0 predicts nothing (no previous token)
            yield {
                "id": ids[row],
                INPUT_IDS: input_ids[s:e].astype(np.int64),
                LOSS_MASK: mask,
                # Copies: the row group's arrays are read-only Arrow memory, and an example outlives it.
                "score": score[s:e].copy(),
                "ref_loss": None if ref is None else ref[s:e].astype(np.float32),
                "source": int(source_index[row]),
            }

    # --- iteration ---------------------------------------------------------------------------

    def _ensure_roles(self, num_roles: int) -> None:
        if self._num_roles is None:
            self._num_roles = num_roles
            self._roles = [{"epoch": 0, "cursor": 0, "skipped": 0} for _ in range(num_roles)]
            self._next_role = 0
        elif self._num_roles != num_roles:
            raise ValueError(f"this stream's position is split over {self._num_roles} reader(s) (DataLoader num_workers="
                             f"{self._num_roles}, or 0 for one); it is being read by {num_roles}: resume with the same "
                             "num_workers, or start from a fresh stream")

    def _role_examples(self, role: int, num_roles: int, state: dict[str, int], final: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Role ``role``'s examples from ``state`` on, epoch after epoch; each carries its position after it.

        When the role's stream ends, ``final`` receives its last position (skips after the last
        example included), for the end-of-stream marker.
        """
        if not self.balance_tokens:
            start, stop = self._block(role, num_roles)
            if stop <= start:
                return  # more workers than examples in this rank's share: this role has nothing, ever
        epoch, cursor, skipped = state["epoch"], state["cursor"], state["skipped"]
        while self.epochs is None or epoch < self.epochs:
            start, stop = self._block(role, num_roles, epoch)  # token-balanced blocks differ by epoch
            yielded = False
            for example in self._epoch_rows(epoch, start + cursor, stop):
                cursor += 1
                if not example[LOSS_MASK].any():
                    skipped += 1
                    continue
                yielded = True
                example["epoch"] = epoch
                example["position"] = {"role": role, "roles": num_roles, "epoch": epoch, "cursor": cursor, "skipped": skipped}
                yield example
            if not yielded and state["cursor"] == 0 and self.epochs is None:
                # A whole epoch of this role without one trainable example: stop rather than spin forever.
                final.update(epoch=epoch + 1, cursor=0, skipped=skipped)
                return
            epoch, cursor, state = epoch + 1, 0, {"epoch": epoch + 1, "cursor": 0, "skipped": skipped}
        final.update(epoch=epoch, cursor=0, skipped=skipped)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_roles, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        self._ensure_roles(num_roles)
        self.read_sources()  # before the first unit (workers got them from the main process: no pass of their own)
        # Rotation: worker 0 takes the role the interrupted run would have served next.
        role = (self._next_role + worker) % num_roles
        final: dict[str, int] = {}
        last_skipped = self._roles[role]["skipped"]
        source: Iterable[dict[str, Any]] = self._role_examples(role, num_roles, dict(self._roles[role]), final)
        if self.max_tokens is not None:
            # Pack per epoch so a micro-batch never spans two epochs (its position names one).
            source = (batch for _, group in itertools.groupby(source, key=lambda ex: ex["epoch"])
                      for batch in pack(group, self.max_tokens))
        for item in source:
            if self.max_tokens is None:
                item = {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in item.items()}
            if info is None:  # in-process: this object is the caller's, keep its position current
                self.record(item)
            last_skipped = item["position"]["skipped"]
            yield item
        if final and final["skipped"] != last_skipped:
            # Examples skipped after the last item would go uncounted: a position-only marker carries them.
            end = {"end_of_stream": True, "position": {"role": role, "roles": num_roles, **final}}
            if info is None:
                self.record(end)
            else:
                yield end  # the main process records it and drops it (see _deliver)

    def record(self, item: dict[str, Any]) -> None:
        """Note that ``item`` (example or micro-batch) was handed to the caller: advance the position."""
        position = item["position"]
        if self._num_roles is None:
            self._ensure_roles(int(position["roles"]))
        role = int(position["role"])
        self._roles[role] = {"epoch": int(position["epoch"]), "cursor": int(position["cursor"]), "skipped": int(position["skipped"])}
        self._next_role = (role + 1) % int(position["roles"])

    def _deliver(self, num_workers: int, loader_kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if num_workers == 0:
            yield from iter(self)
            return
        self._ensure_roles(num_workers)  # before the workers copy this object
        self.read_sources()  # once here, not once per worker
        loader = DataLoader(self, batch_size=None, num_workers=num_workers, **loader_kwargs)
        for item in loader:
            self.record(item)
            if not item.get("end_of_stream"):
                yield item

    def micro_batches(self, max_tokens: int, num_workers: int = 0, **loader_kwargs: Any) -> Iterator[dict[str, Any]]:
        """Packed micro-batches (see :func:`pack`), through a DataLoader when ``num_workers`` > 0.

        The position is recorded as each batch is handed out, so :meth:`state_dict` taken between two
        batches resumes at the next one exactly. ``num_workers`` must stay the same across a resume.
        """
        self.max_tokens = int(max_tokens)
        return self._deliver(num_workers, loader_kwargs)

    def examples(self, num_workers: int = 0, **loader_kwargs: Any) -> Iterator[dict[str, Any]]:
        """Single examples (tensors), through a DataLoader when ``num_workers`` > 0."""
        self.max_tokens = None
        return self._deliver(num_workers, loader_kwargs)

    # --- position ----------------------------------------------------------------------------

    @property
    def skipped_no_trainable(self) -> int:
        """Examples skipped for having no trainable token, up to the last item handed out."""
        return sum(role["skipped"] for role in self._roles)

    @property
    def epoch(self) -> int:
        """The oldest epoch a role is still in (roles advance independently)."""
        return min((role["epoch"] for role in self._roles), default=0)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable position, plus what the order depends on (checked on load)."""
        return {
            "version": STATE_VERSION,
            "uri": self.uri,
            "score": self.score,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_examples": self.num_examples,
            "balance_tokens": self.balance_tokens,
            "num_roles": self._num_roles,
            "roles": copy.deepcopy(self._roles),
            "next_role": self._next_role,
            "max_tokens": self.max_tokens,
            "skipped_no_trainable": self.skipped_no_trainable,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state whose order this stream would not reproduce."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')}, this code reads {STATE_VERSION} (version 1 "
                             "split ranks by example count; its position cannot continue a token-balanced order)")
        for key in ("seed", "shuffle", "rank", "world_size", "num_examples", "balance_tokens"):
            if state[key] != getattr(self, key):
                raise ValueError(f"stream state has {key}={state[key]!r}, this stream {getattr(self, key)!r}: "
                                 "resuming would not continue the same order (same data, seed and world_size needed)")
        self._num_roles = state["num_roles"]
        self._roles = copy.deepcopy(state["roles"])
        self._next_role = int(state["next_role"])
