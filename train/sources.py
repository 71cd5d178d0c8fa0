"""Per-source losses (ms-swift's "channel loss"): CE, group losses and token counts per value of the shards' ``source``.

    keys = source_keys(stream.sources)                              # metric-safe names, in the stream's order
    sums = torch.zeros(len(keys), len(SOURCE_SUM_NAMES), dtype=torch.float64)
    add_source_sums(sums, token_loss, source, important)            # per micro-batch, on this rank; no collective
    dist.all_reduce(sums)                                           # the trainer folds it into the step's one all-reduce
    record.update(source_record(sums, keys, groups=True))           # source/<key>/tokens, /ce, /important_loss, ...

The set of sources is the directory's distinct ``source`` values, sorted (``ShardStream.sources``, read at plan
time from the data: the manifest does not list them), so it is the same on every rank and across a resume, and a
source's row in ``sums`` means the same on every rank: summing the ranks' sums gives exactly the single-process
numbers on the same data (float64 sums; token counts are whole). Names are any strings (file names, paths, URLs):
:func:`source_keys` makes them safe as metric keys (TensorBoard tags, W&B keys, JSON) and keeps them apart.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["SOURCE_SUM_NAMES", "MAX_SOURCE_METRICS", "CONSOLE_SOURCES", "source_keys", "add_source_sums", "source_record",
           "SourceWindow", "source_lines", "describe_sources"]

#: The columns of the training sums, one row per source: the CE sum and trainable tokens, and the important group's.
SOURCE_SUM_NAMES = ("ce_sum", "tokens", "important_sum", "important_tokens")
#: Above this many sources the trainer logs no per-source numbers (a source per row is an id, not a corpus: thousands
#: of keys per record would swamp metrics.jsonl and TensorBoard). It says so at start-up.
MAX_SOURCE_METRICS = 64
#: The progress bar shows each source's CE when the data has 2 to this many sources (metrics.jsonl always has them).
CONSOLE_SOURCES = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_KEY_CHARS = 48


def source_keys(names: Sequence[str]) -> list[str]:
    """A metric-safe key per source name, in order. A name of letters, digits, ``_``, ``.`` and ``-`` only (at most 48
    characters) is its own key. In others, runs of other characters become one ``_`` (a ``/`` would nest TensorBoard
    tags), trimmed of ``_`` at the ends and cut to 48 characters; a name with nothing left (empty, or all in other
    scripts) becomes ``source_`` and 8 hex digits of its sha256; a key already taken (by a name that is its own key, or
    an earlier name that cleans up alike) gets ``_2``, ``_3``, ... Deterministic for a given list (the stream's)."""
    names = [str(name) for name in names]
    cleaned = [_UNSAFE.sub("_", name).strip("_")[:_KEY_CHARS] or "source_" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
               for name in names]
    taken = {name for name, clean in zip(names, cleaned) if name == clean}  # safe names keep their own key
    keys: list[str] = []
    for name, base in zip(names, cleaned):
        if name == base:
            keys.append(base)
            continue
        key, n = base, 1
        while key in taken:
            n += 1
            key = f"{base}_{n}"
        taken.add(key)
        keys.append(key)
    return keys


def add_source_sums(sums: Tensor, token_loss: Tensor, source: Tensor, important: Tensor) -> None:
    """Add one micro-batch's per-source sums (:data:`SOURCE_SUM_NAMES`) into ``sums`` ``[n_sources, 4]`` (float64).

    ``token_loss``: the per-token CE of the trainable tokens ``[n]`` (detached here); ``source``: their source indices
    ``[n]``; ``important``: their group mask ``[n]`` (all False without groups). No collective: the caller sums ranks."""
    loss = token_loss.detach().double().to(sums.device)
    imp = important.to(sums.device, torch.float64)
    values = torch.stack([loss, torch.ones_like(loss), loss * imp, imp], 1)
    sums.index_add_(0, source.to(sums.device, torch.long), values)


def source_record(sums: Tensor, keys: Sequence[str], groups: bool, prefix: str = "source/") -> dict[str, Any]:
    """Record keys from per-source sums ``[n_sources, 4]`` (summed over ranks): ``<prefix><key>/tokens`` (trainable
    tokens), ``/ce`` (their mean CE), and with ``groups`` ``/important_loss`` and ``/unimportant_loss`` (each group's
    mean CE). A mean over no token is left out, not logged as 0."""
    record: dict[str, Any] = {}
    for key, (ce_sum, tokens, imp_sum, imp_tokens) in zip(keys, sums.tolist()):
        tokens, imp_tokens = int(round(tokens)), int(round(imp_tokens))
        record[f"{prefix}{key}/tokens"] = tokens
        if tokens:
            record[f"{prefix}{key}/ce"] = ce_sum / tokens
        if groups and imp_tokens:
            record[f"{prefix}{key}/important_loss"] = imp_sum / imp_tokens
        if groups and tokens - imp_tokens:
            record[f"{prefix}{key}/unimportant_loss"] = (ce_sum - imp_sum) / (tokens - imp_tokens)
    return record


class SourceWindow:
    """The per-source sums of the steps since the last record that logged them (all ranks', float64 on the CPU).

    The trainer adds every step's all-reduced sums and takes them every ``train.log_every`` steps and at the last
    step, so each logged value covers every token since the previous one (``log_every=1``: that step alone). After a
    resume the first window starts at the resumed step."""

    def __init__(self, names: Sequence[str], groups: bool) -> None:
        self.names, self.keys, self.groups = list(names), source_keys(names), groups
        self.sums = torch.zeros(len(self.names), len(SOURCE_SUM_NAMES), dtype=torch.float64)

    @classmethod
    def open(cls, names: Sequence[str], where: str, groups: bool) -> SourceWindow | None:
        """Log which sources of ``where`` get per-source metrics; their window, or None where there are more than
        :data:`MAX_SOURCE_METRICS` values (ids rather than corpora)."""
        from train.metrics import log0

        log0(describe_sources(names, where))
        return cls(names, groups) if len(names) <= MAX_SOURCE_METRICS else None

    def step_sums(self, device: torch.device) -> Tensor:
        """A step's empty per-source sums (``[n_sources, 4]``, float64 on ``device``), filled by the step's micro-batches."""
        return torch.zeros(len(self.names), len(SOURCE_SUM_NAMES), dtype=torch.float64, device=device)

    def add(self, sums: Tensor) -> None:
        """Add one step's per-source sums (``[n_sources, 4]``, already summed over ranks)."""
        self.sums += sums.detach().to("cpu", torch.float64).reshape(self.sums.shape)

    def take(self) -> dict[str, Any]:
        """The window's record keys (:func:`source_record`); the window starts again empty."""
        record = source_record(self.sums, self.keys, self.groups)
        self.sums.zero_()
        return record

    def postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """Each source's CE for the progress bar (``ce[<key>]``, the key cut to 16 characters), when the data has 2 to
        :data:`CONSOLE_SOURCES` sources; else nothing (one source is the record's ``ce``; many would not fit on a line)."""
        if not 2 <= len(self.keys) <= CONSOLE_SOURCES:
            return {}
        return {f"ce[{key[:16]}]": f"{record[f'source/{key}/ce']:.3f}" for key in self.keys if f"source/{key}/ce" in record}


def source_lines(record: dict[str, Any], prefix: str, title: str, limit: int = 10) -> list[str]:
    """Log lines of a record's per-source keys (``<prefix><key>/<name>``), one per source: ``<title> <key>: name=value,
    ...``; at most ``limit`` sources (then one line saying how many more metrics.jsonl holds)."""
    from train.metrics import format_record

    by_source: dict[str, dict[str, Any]] = {}
    for name, value in record.items():
        if name.startswith(prefix):
            key, _, field = name[len(prefix):].rpartition("/")
            by_source.setdefault(key, {})[field] = value
    lines = [f"{title} {key}: {format_record(values)}" for key, values in list(by_source.items())[:limit]]
    if len(by_source) > limit:
        lines.append(f"{title}: {len(by_source) - limit} more sources in metrics.jsonl")
    return lines


def describe_sources(names: Sequence[str], where: str) -> str:
    """The start-up line naming the sources whose numbers are logged (or why none are)."""
    if len(names) > MAX_SOURCE_METRICS:
        return (f"per-source metrics: off ({len(names)} distinct source values in {where}, more than {MAX_SOURCE_METRICS}: "
                "ids rather than corpora)")
    shown = ", ".join(f"{key}" + (f" ({name!r})" if key != name else "") for key, name in zip(source_keys(names), names))
    return f"per-source metrics: {len(names)} source(s) in {where}: {shown}"
