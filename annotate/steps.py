"""The annotate job's steps as plain functions (no Ray): plan -> tokenize -> dedupe -> write -> finalize.

A shard is the unit of work, of resume and of output: shard i covers a fixed range of input records
(``shard_size`` records of one file), so a rerun plans the same shards and skips those already on disk.
Everything a shard holds is derived from its records alone (dedupe aside, which is global and
deterministic: the first occurrence in shard order wins), so a killed job rerun gives the same bytes.

Layout of an output directory while running and when done::

    _work/tokens-00003.parquet     tokenized, not yet scored (deleted once the shard is written)
    _work/rejects-00003.jsonl      rejected records of shard 3 (file, line, reason)
    shard-00003.parquet            the finished shard (shard schema v2), written atomically
    _rejects.jsonl, _README.md, _manifest.json   written last, by finalize (manifest last of all)
    .annotate.lock                 held (flock) by the job writing here; removed when it ends
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from annotate.card import write_card
from data import sources
from data.formats import (
    DEFAULT_MAX_RECORD_BYTES,
    Messages,
    OversizedRecord,
    RecordError,
    Rejected,
    iter_raw_records,
    parse_record,
    read_lines,
    source_name,
    where,
)
from data.given import GIVEN_COLUMN, GivenTurn, content_ranges, read_given, token_values
from data.render import render_batch
from schemas.shard import (
    EXCESS_LOSS,
    EXCESS_LOSS_PARTS,
    ID,
    INPUT_IDS,
    LOSS_MASK,
    REJECTS_NAME,
    SCHEMA_VERSION,
    SHARD_GLOB,
    SOURCE,
    Manifest,
    ScorerInfo,
    ShardEntry,
    ShardMetadata,
    arrow_schema,
    atomic_write_text,
    example_id,
    file_sha256,
    first_non_finite,
    merge_summaries,
    score_column,
    shard_name,
    system_prompt_of,
    summarize_scores,
)

WORK_DIR = "_work"
LINE = "_line"  # staging-only column: the record's line (or array position) in its input file
FILE = "_file"  # staging-only column: the input file


class StrictModeError(ValueError):
    """--strict and a bad record: names the file, line and reason."""


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    index: int
    file: str
    format: str
    first_line: int
    last_line: int
    sha256: str  # hash of the records' raw bytes: a changed input file invalidates a finished shard
    byte_range: tuple[int, int] | None = None  # JSONL: where the records lie in the file
    items: list[tuple[int, Any]] | None = None  # JSON array: the records themselves
    records: int = 0
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES  # longer records are rejected unread (like strict, not in key())
    container: str = "jsonl"  # data/sources.py: json (items), jsonl / csv / tsv (byte_range), parquet / arrow (rows)
    rows: tuple[int, int] | None = None  # Parquet / Arrow: the row range [start, end) in the file
    columns: dict[str, str] | None = None  # --columns: the layout's fields -> the records' columns

    def key(self, job: dict[str, Any]) -> dict[str, Any]:
        """What a finished shard on disk must match to count as this shard (stored in its metadata)."""
        mapping = {"columns": dict(sorted(self.columns.items()))} if self.columns else {}  # (absent: older shards match)
        return {"file": os.path.basename(self.file), "format": self.format, "lines": [self.first_line, self.last_line],
                "records": self.records, "sha256": self.sha256, **mapping, **job}


def _detect_file_format(source: sources.InputFile, requested: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                        columns: dict[str, str] | None = None) -> str:
    return sources.detect_layout(source, requested, columns, max_record_bytes)


def check_inputs(inputs: list[str], fmt: str, container: str = "auto", columns: dict[str, str] | None = None,
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict[str, str]:
    """Pre-flight (before Ray starts): every input is a container this job reads, holds a record, and has a
    layout (``fmt``, or recognised) whose mapped columns it has. Returns each file's layout; ValueError naming
    the input and what is wrong (the layouts, the columns seen) otherwise."""
    layouts = {}
    for path in inputs:
        files = sources.expand(path, container)
        if not any(sources.has_records(f, max_record_bytes) for f in files):
            raise ValueError(f"{path}: holds no record")
        for f in files:
            layouts[f.path] = _detect_file_format(f, fmt, max_record_bytes, columns)
    return layouts


def first_messages(inputs: list[str], fmt: str, container: str = "auto", columns: dict[str, str] | None = None,
                   max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterable[Messages]:
    """The messages of the first input's readable records, in order (bad records skipped)."""
    source = sources.expand(inputs[0], container)[0]
    layout = _detect_file_format(source, fmt, max_record_bytes, columns)
    for _, raw in sources.iter_records(source, max_record_bytes):
        try:
            yield parse_record(raw, layout, columns)[0]
        except ValueError:
            continue  # a bad record is the tokenize stage's to reject


def plan_shards(inputs: list[str], fmt: str, shard_size: int, limit: int = 0,
                max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES, container: str = "auto",
                columns: dict[str, str] | None = None) -> list[ShardPlan]:
    """Split every input (its files: data/sources.py) into shards of ``shard_size`` records, numbered across
    files; ``limit``: the first records of each input."""
    plans: list[ShardPlan] = []
    for path in inputs:
        left = limit
        for source in sources.expand(path, container):
            if limit and left <= 0:
                break
            before = len(plans)
            _plan_file(plans, source, fmt, shard_size, left, max_record_bytes, columns)
            left -= sum(p.records for p in plans[before:])
    for plan in plans:
        plan.max_record_bytes = max_record_bytes
        plan.columns = columns or None
    return plans


def _plan_file(plans: list[ShardPlan], source: sources.InputFile, fmt: str, shard_size: int, limit: int,
               max_record_bytes: int, columns: dict[str, str] | None) -> None:
    path = source.path
    file_format = _detect_file_format(source, fmt, max_record_bytes, columns)
    if source.container in sources.TEXT_CONTAINERS + sources.TABLE_CONTAINERS:
        text = source.container in sources.TEXT_CONTAINERS
        segments = (sources.csv_segments(source, shard_size, limit, max_record_bytes) if text else
                    sources.table_segments(source, shard_size, limit))
        for first, last, count, digest, span in segments:
            plans.append(ShardPlan(len(plans), path, file_format, first, last, digest, records=count,
                                   container=source.container, byte_range=span if text else None,
                                   rows=None if text else span))
        return
    if source.container == "json":
        items = list(iter_raw_records(path, max_record_bytes))
        if limit:
            items = items[:limit]
        for start in range(0, len(items), shard_size):
            chunk = items[start:start + shard_size]
            digest = hashlib.sha256(json.dumps(chunk, sort_keys=True, ensure_ascii=False, default=repr).encode()).hexdigest()
            plans.append(ShardPlan(len(plans), path, file_format, chunk[0][0], chunk[-1][0], digest, items=chunk, records=len(chunk),
                                   container="json"))
        return
    # JSONL: one pass over bytes to find record boundaries; the records are read by the tokenize step.
    with open(path, "rb") as f:
        offset, number, count = 0, 0, 0
        chunk_start, chunk_first, chunk_count, digest = None, 0, 0, hashlib.sha256()
        for line, size in read_lines(f, max_record_bytes):
            number += 1
            line_start, offset = offset, offset + size
            oversized = isinstance(line, OversizedRecord)
            if not oversized and not line.strip():
                continue
            if limit and count >= limit:
                break
            count += 1
            if chunk_start is None:
                chunk_start, chunk_first, chunk_count, digest = line_start, number, 0, hashlib.sha256()
            # An oversized line is never read whole: its size stands for it (it is rejected either way).
            digest.update(f"<{size} bytes>\n".encode() if oversized else line)
            chunk_count += 1
            chunk_last, chunk_end = number, offset
            if chunk_count == shard_size:
                plans.append(ShardPlan(len(plans), path, file_format, chunk_first, chunk_last, digest.hexdigest(),
                                       byte_range=(chunk_start, chunk_end), records=chunk_count))
                chunk_start = None
        if chunk_start is not None:
            plans.append(ShardPlan(len(plans), path, file_format, chunk_first, chunk_last, digest.hexdigest(),
                                   byte_range=(chunk_start, chunk_end), records=chunk_count))


def _plan_records(plan: ShardPlan) -> Iterable[tuple[int, Any]]:
    if plan.items is not None:
        yield from plan.items
        return
    if plan.rows is not None:
        yield from sources.read_rows(sources.InputFile(plan.file, plan.container), *plan.rows)
        return
    if plan.container in sources.TEXT_CONTAINERS:
        assert plan.byte_range is not None
        yield from sources.read_csv_span(sources.InputFile(plan.file, plan.container), plan.byte_range, plan.first_line,
                                         plan.max_record_bytes)
        return
    assert plan.byte_range is not None
    start, end = plan.byte_range
    with open(plan.file, "rb") as f:
        f.seek(start)
        number, offset = plan.first_line, start
        for line, size in read_lines(f, plan.max_record_bytes):
            if offset >= end:
                break
            if isinstance(line, OversizedRecord) or line.strip():
                yield number, line
            number += 1
            offset += size


# ---------------------------------------------------------------------------------------------
# Tokenize
# ---------------------------------------------------------------------------------------------




def tokenize_shard(plan: ShardPlan, tokenizer: Any, max_length: int, overlength: str, strict: bool,
                   system_prompt: str = "default") -> tuple[pa.Table, list[Rejected], int]:
    """Read, render and tokenize one shard's records. Returns (staging table, rejects, truncated count).
    ``system_prompt``: default, none or a text (data/render.py).

    The staging table also carries ``_given`` (data/given.py): the importance the records supply
    themselves, per token (NaN where they say nothing), for the ``given`` scorer; it is never written
    into a finished shard. Records whose weights or spans are bad are rejects like any bad record."""
    ids, sources, input_ids, loss_masks, lines, given_values = [], [], [], [], [], []
    rejects: list[Rejected] = []
    truncated = 0
    default_source = source_name(plan.file)
    parsed: list[tuple[int, Messages, dict[str, Any], list[GivenTurn] | None]] = []
    for line, raw in _plan_records(plan):
        try:
            messages, record = parse_record(raw, plan.format, plan.columns)
            given = read_given(record, plan.format, messages)
        except RecordError as exc:
            rejects.append(Rejected(plan.file, line, exc.reason, exc.detail))
            continue
        parsed.append((line, messages, record, given))
    # One tokenizer call for the shard (render_batch): per record, 2x faster than render() one by one.
    # Token offsets only when a record supplies importance (they place it on tokens).
    with_offsets = any(given is not None for *_, given in parsed)
    rendered_all = render_batch(tokenizer, [messages for _, messages, _, _ in parsed], max_length, overlength,
                                with_offsets=with_offsets, system_prompt=system_prompt)
    for (line, messages, record, given), rendered in zip(parsed, rendered_all):
        if isinstance(rendered, RecordError):
            rejects.append(Rejected(plan.file, line, rendered.reason, rendered.detail))
            continue
        if given is None:
            values = np.full(len(rendered.input_ids), np.nan, dtype=np.float32)
        else:
            try:
                values = token_values(given, content_ranges(tokenizer, messages, rendered.text, system_prompt), rendered.offsets)
            except RecordError as exc:
                rejects.append(Rejected(plan.file, line, exc.reason, exc.detail))
                continue
        truncated += rendered.truncated
        source = record.get("source")
        ids.append(example_id(messages))
        sources.append(source if isinstance(source, str) and source else default_source)
        input_ids.append(rendered.input_ids)
        loss_masks.append(rendered.loss_mask)
        lines.append(line)
        given_values.append(values)
    rejects.sort(key=lambda r: r.line)  # parse and render rejects, in file order
    if strict and rejects:
        first = rejects[0]
        raise StrictModeError(f"{where(first.file, first.line)}: {first.reason}: {first.detail} (--strict)")
    table = pa.table({
        ID: pa.array(ids, pa.string()),
        SOURCE: pa.array(sources, pa.string()),
        INPUT_IDS: pa.array(input_ids, pa.list_(pa.int32())),
        LOSS_MASK: pa.array(loss_masks, pa.list_(pa.bool_())),
        LINE: pa.array(lines, pa.int64()),
        FILE: pa.array([plan.file] * len(ids), pa.string()),
        GIVEN_COLUMN: pa.array(given_values, pa.list_(pa.float32())),
    })
    return table, rejects, truncated


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def write_table_atomic(table: pa.Table, path: Path) -> None:
    """Parquet write to a temporary name, then rename: a killed job never leaves a partial shard, and a
    failed write (a full disk) leaves nothing of its file behind."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write {path}: {exc}") from exc  # as atomic_write_text does: name the file
    finally:
        if tmp.exists():
            tmp.unlink()


def write_rejects(rejects: list[Rejected], path: Path) -> None:
    atomic_write_text(path, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rejects))


def read_rejects(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def staging_path(out: Path, index: int) -> Path:
    return out / WORK_DIR / f"tokens-{index:05d}.parquet"


def staging_rejects_path(out: Path, index: int) -> Path:
    return out / WORK_DIR / f"tokenize-rejects-{index:05d}.jsonl"


def shard_rejects_path(out: Path, index: int) -> Path:
    return out / WORK_DIR / f"rejects-{index:05d}.jsonl"


def read_shard_metadata(path: Path) -> ShardMetadata | None:
    try:
        return ShardMetadata.from_schema(pq.read_schema(path))
    except (KeyError, OSError, pa.ArrowInvalid, json.JSONDecodeError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Dedupe (global, deterministic: first occurrence in shard order, then row order)
# ---------------------------------------------------------------------------------------------


def find_duplicates(ids_by_shard: dict[int, list[str]]) -> dict[int, list[int]]:
    """Row indices, per shard, whose id already appeared in an earlier shard or earlier row."""
    seen: set[str] = set()
    duplicates: dict[int, list[int]] = {}
    for index in sorted(ids_by_shard):
        for row, example in enumerate(ids_by_shard[index]):
            if example in seen:
                duplicates.setdefault(index, []).append(row)
            else:
                seen.add(example)
    return duplicates


def drop_duplicates(table: pa.Table, rows: list[int]) -> tuple[pa.Table, list[Rejected]]:
    if not rows:
        return table, []
    keep = np.ones(table.num_rows, dtype=bool)
    keep[rows] = False
    dropped = table.filter(pa.array(~keep))
    rejects = [Rejected(f, int(line), "duplicate", f"same content as an earlier example (id {i})")
               for f, line, i in zip(dropped[FILE].to_pylist(), dropped[LINE].to_pylist(), dropped[ID].to_pylist())]
    return table.filter(pa.array(keep)), rejects


# ---------------------------------------------------------------------------------------------
# Write a finished shard
# ---------------------------------------------------------------------------------------------


def trainable_scores(table: pa.Table, column: str) -> np.ndarray:
    """All trainable-token values of a list column, flattened."""
    values = pc.list_flatten(table[column]).to_numpy(zero_copy_only=False)
    mask = pc.list_flatten(table[LOSS_MASK]).to_numpy(zero_copy_only=False).astype(bool)
    return values[mask]


def shard_score_stats(table: pa.Table, scorers: list[str]) -> dict[str, dict[str, Any]]:
    """Per-scorer quantile summaries of trainable-token scores (plus excess_loss when derivable)."""
    stats = {name: summarize_scores(trainable_scores(table, score_column(name))) for name in scorers}
    if all(part in scorers for part in EXCESS_LOSS_PARTS):
        base, ref = (trainable_scores(table, score_column(p)) for p in EXCESS_LOSS_PARTS)
        stats[EXCESS_LOSS] = summarize_scores(base.astype(np.float64) - ref.astype(np.float64))
    return stats


def write_shard(out: Path, index: int, table: pa.Table, scorers: list[ScorerInfo], tokenizer_fp: dict[str, str],
                plan_key: dict[str, Any], reject_counts: dict[str, int]) -> Path:
    """Write shard ``index`` (schemas v1 columns in order, metadata with plan and score stats)."""
    names = [s.name for s in scorers]
    for name in names:
        column = table[score_column(name)]
        values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy(zero_copy_only=False))])
        row = first_non_finite(values, offsets)
        if row is not None:
            raise ValueError(f"scorer {name!r} produced NaN or infinite scores in shard {index} (row {row})")
    metadata = ShardMetadata(
        schema_version=SCHEMA_VERSION, tokenizer=tokenizer_fp, scorers=scorers, shard_index=index,
        plan={**plan_key, "rejected": reject_counts}, score_stats=shard_score_stats(table, names),
    )
    schema = arrow_schema(names, metadata)
    final = pa.Table.from_arrays([table[c].cast(schema.field(c).type) for c in schema.names], schema=schema)
    path = out / shard_name(index)
    write_table_atomic(final, path)
    return path


# ---------------------------------------------------------------------------------------------
# Finalize
# ---------------------------------------------------------------------------------------------


def finalize(out: Path, config: dict[str, Any], tokenizer_fp: dict[str, str], scorers: list[ScorerInfo],
             expected_shards: list[int] | None = None, system_turn: dict[str, Any] | None = None) -> Manifest:
    """Write _rejects.jsonl, the dataset card and then _manifest.json (last) from the finished shards' footers.

    ``system_turn``: the system turn the chat template writes by itself (``text``; ``offset`` and ``ids``: where
    it sits in token ids, data.render.template_system_ids), or None: the manifest's ``system_prompt`` records
    the choice and, under ``default``, how many rows hold that turn and the share of all tokens it takes."""
    shard_paths = sorted(out.glob(SHARD_GLOB))
    if expected_shards is not None:
        have = {int(p.stem.split("-")[1]) for p in shard_paths}
        missing = sorted(set(expected_shards) - have)
        if missing:
            raise RuntimeError(f"{out}: shards {missing[:10]} are missing; rerun the job to finish them")
    entries, stats_parts = [], {}
    rejected: Counter[str] = Counter()
    totals = Counter()
    turn_rows = 0
    all_rejects: list[dict[str, Any]] = []
    for path in shard_paths:
        meta = read_shard_metadata(path)
        if meta is None:
            raise RuntimeError(f"{path}: not an sftgo shard (no metadata)")
        table = pq.read_table(path, columns=[INPUT_IDS, LOSS_MASK])
        tokens = int(pc.sum(pc.list_value_length(table[INPUT_IDS])).as_py() or 0)
        trainable = int(pc.sum(pc.list_flatten(table[LOSS_MASK]).cast(pa.int64())).as_py() or 0)
        entries.append(ShardEntry(path.name, table.num_rows, tokens, trainable, file_sha256(path)))
        totals.update({"rows": table.num_rows, "tokens": tokens, "trainable_tokens": trainable})
        if system_turn is not None and system_turn.get("ids"):
            turn_rows += rows_starting_with(table[INPUT_IDS], system_turn["offset"], system_turn["ids"])
        totals["truncated"] += int(meta.plan.get("truncated", 0))
        rejected.update(meta.plan.get("rejected", {}))
        for name, summary in meta.score_stats.items():
            stats_parts.setdefault(name, []).append(summary)
        all_rejects.extend(read_rejects(shard_rejects_path(out, meta.shard_index)))
    totals["shards"] = len(entries)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, tokenizer=tokenizer_fp, scorers=scorers, shards=entries,
        totals=dict(totals), rejected=dict(sorted(rejected.items())),
        score_stats={name: merge_summaries(parts) for name, parts in stats_parts.items()}, config=config,
        system_prompt=system_prompt_record(tokenizer_fp, system_turn, turn_rows, totals.get("tokens", 0)),
    )
    if (out / WORK_DIR).exists() or not (out / REJECTS_NAME).exists():
        atomic_write_text(out / REJECTS_NAME, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rejects))
    write_card(out, manifest)
    manifest.save(out)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    return manifest


def rows_starting_with(input_ids: pa.ChunkedArray | pa.Array, offset: int, ids: list[int]) -> int:
    """Rows whose tokens ``offset .. offset + len(ids)`` are ``ids`` (a template's own system turn)."""
    if isinstance(input_ids, pa.ChunkedArray):
        return sum(rows_starting_with(chunk, offset, ids) for chunk in input_ids.chunks)
    values = input_ids.values.to_numpy(zero_copy_only=False)
    offsets = input_ids.offsets.to_numpy()
    starts, lengths = offsets[:-1], np.diff(offsets)
    long_enough = starts[lengths >= offset + len(ids)]
    if not long_enough.size:
        return 0
    window = values[long_enough[:, None] + offset + np.arange(len(ids))]
    return int((window == np.asarray(ids, dtype=values.dtype)).all(axis=1).sum())


def system_prompt_record(tokenizer_fp: dict[str, str], system_turn: dict[str, Any] | None, rows: int, tokens: int) -> dict[str, Any]:
    """The manifest's ``system_prompt``: the choice (as the tokenizer fingerprint records it), the template's own
    system turn (None: it writes none) and, under ``default``, the rows holding it and its share of all tokens."""
    choice = system_prompt_of(tokenizer_fp)
    record: dict[str, Any] = {"choice": choice, "template_turn": system_turn["text"] if system_turn else None}
    if system_turn and choice == "default":
        n = len(system_turn.get("ids") or [])
        record.update({"template_turn_tokens": n, "rows_with_template_turn": rows,
                       "template_turn_token_share": rows * n / tokens if tokens else 0.0})
    return record


@dataclass
class StageTimer:
    """Rows, tokens and seconds of one stage, for the end-of-job summary."""

    name: str
    rows: int = 0
    tokens: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def add(self, rows: int, tokens: int, seconds: float) -> None:
        self.rows += rows
        self.tokens += tokens
        self.seconds += seconds

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("started")
        out["tokens_per_s"] = self.tokens / self.seconds if self.seconds > 0 else None
        return out


LOCK_NAME = ".annotate.lock"


class OutputLock:
    """Holds an output directory for one job: a second job on it fails at once, naming this one.

    An flock, which the kernel drops when the process dies, so a killed job never leaves it stuck;
    the file says who holds it (host, pid, command) for the second job's message."""

    def __init__(self, out: Path):
        self.path = out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise OSError naming the job that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another job"
                os.close(fd)
                raise OSError(f"{self.path.parent} is in use by a running annotate job ({holder}); wait for it to "
                              f"finish or stop it, or use another --output") from None
            # The holder may have removed the file between our open and our lock: then lock the new one.
            if self.path.exists() and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                     f"{' '.join(sys.argv)}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # still holding the lock, so no other job is using the file
        os.close(self.fd)
        self.fd = None
