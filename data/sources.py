"""Input files: the container a corpus comes in, separate from the record layout (data/formats.py).

A container holds records; a layout (alpaca, lima, messages, sharegpt, text) says which fields of a record
hold the conversation. Any container holds any layout, and ``--columns`` renames a record's fields to the
layout's (:func:`map_columns`), so a CSV of Question / Best Answer is alpaca once
``--columns instruction=Question,output='Best Answer'`` names them.

Containers (``--container``, by default recognised from the file name, the folder layout and the bytes):

- ``jsonl``: one JSON object a line (``.jsonl``, ``.ndjson``, any file not starting with ``[``).
- ``json``: one JSON array of objects (a file starting with ``[``), parsed whole.
- ``csv`` / ``tsv``: a header line of column names, then one record a row (``.csv``, ``.tsv``, ``.tab``); a
  quoted field may span lines. Cells are text; a ``messages`` / ``conversations`` cell holds JSON text.
- ``parquet``: a Parquet file, or a folder of them as the Hugging Face Hub stores a dataset
  (``data/train-00000-of-00001.parquet``); read a batch of rows at a time, never whole.
- ``arrow``: a ``datasets`` ``save_to_disk`` folder (``data-00000-of-00001.arrow`` + ``state.json`` +
  ``dataset_info.json``), memory-mapped; or one ``.arrow`` file.

A folder may hold one split only: a folder of several (``train-*`` and ``test-*`` files, a ``DatasetDict``
with ``dataset_dict.json``) is refused, naming them. A record's position (a reject's ``line``): the line of
a JSONL record, the first line of a CSV record (the header is line 1), the item number of a JSON array,
the 0-based row index of a Parquet or Arrow file.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from data.formats import (
    DEFAULT_MAX_RECORD_BYTES,
    FORMATS,
    OversizedRecord,
    RecordError,
    detect_format,
    is_json_array,
    iter_raw_records,
    map_columns,
    read_lines,
)

CONTAINERS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow")
TABLE_CONTAINERS = ("parquet", "arrow")  # records are rows: positions are row indices, the plan is by row ranges
TEXT_CONTAINERS = ("csv", "tsv")  # records are rows of a delimited text file: the plan is by byte ranges
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
             ".parquet": "parquet", ".arrow": "arrow"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}

#: The field names the layouts read, which ``--columns CANONICAL=COLUMN`` maps a corpus's own columns to.
COLUMNS = {
    "instruction": "alpaca: the prompt",
    "input": "alpaca: optional text appended to the prompt",
    "output": "alpaca: the response",
    "system": "alpaca: optional system prompt",
    "messages": "messages: the list of {role, content} turns",
    "conversations": "lima: the list of turns as strings (user, assistant, ...); sharegpt: the list of {from, value}",
    "text": "text: plain text, trained on in full",
    "source": "any layout: the example's source name (default: the file's name)",
}
LAYOUTS = {  # what each layout reads, for messages
    "alpaca": "instruction, output (optional: input, system)",
    "lima": "conversations (a list of strings: user, assistant, ...)",
    "messages": "messages (a list of {role, content})",
    "sharegpt": "conversations (a list of {from, value})",
    "text": "text",
}
assert tuple(LAYOUTS) == FORMATS


@dataclass(frozen=True)
class InputFile:
    """One file of an input, with its container."""

    path: str
    container: str


# ---------------------------------------------------------------------------------------------
# Which files, which container
# ---------------------------------------------------------------------------------------------


def expand(path: str, container: str = "auto") -> list[InputFile]:
    """The files of one ``--input`` (a file, or a folder of one split) with their container; ValueError
    naming the input when it is none of the containers, or a folder of several splits or none."""
    if not os.path.isdir(path):
        return [InputFile(path, container_of(path, container))]
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = sorted(p.name for p in Path(path).iterdir() if (p / "state.json").exists())
        pick = "train" if "train" in splits or not splits else splits[0]
        raise ValueError(f"{path}: a datasets DatasetDict folder with splits {splits}; give one split's folder, "
                         f"e.g. --input {os.path.join(path, pick)}")
    if os.path.exists(os.path.join(path, "state.json")):  # datasets.Dataset.save_to_disk
        return [InputFile(f, "arrow") for f in _arrow_files(path)]
    files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES
                   and p.name not in _METADATA and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"{path}: a folder without input files (looked for {', '.join(sorted(_SUFFIXES))}, in "
                         f"subfolders too) and not a datasets save_to_disk folder (no state.json)")
    kinds = sorted({"json/jsonl" if kind in ("json", "jsonl") else kind for kind in
                    (_SUFFIXES[Path(f).suffix.lower()] for f in files)})
    if len(kinds) > 1:
        raise ValueError(f"{path}: holds files of several containers ({', '.join(kinds)}); give the files of one")
    splits = _splits(path, files)
    if len(splits) > 1:
        shown = "; ".join(f"{name}: {len(members)} file(s), e.g. {members[0]}" for name, members in splits.items())
        pick = splits.get("train") or next(iter(splits.values()))
        raise ValueError(f"{path}: holds several splits ({shown}); give one split's files, e.g. "
                         f"--input {' '.join(pick[:3])}{' ...' if len(pick) > 3 else ''}")
    return [InputFile(f, container_of(f, container)) for f in files]


_SHARD_NAME = re.compile(r"^(?P<split>.+?)[-_]\d{5}[-_]of[-_]\d{5}\.[a-z]+$")
_SPLIT_NAMES = {"train", "test", "validation", "valid", "val", "dev", "eval"}
_METADATA = {"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"}  # a Hub repo's, datasets'


def _splits(root: str, files: list[str]) -> dict[str, list[str]]:
    """Files by split: the Hub's ``{split}-00000-of-00002.parquet`` names, a split's own name (``train.jsonl``),
    else their folders (the Hub's ``default/train/0000.parquet``)."""
    out: dict[str, list[str]] = {}
    for f in files:
        match = _SHARD_NAME.match(os.path.basename(f))
        stem = Path(f).stem.lower()
        key = (match["split"] if match else stem if stem in _SPLIT_NAMES  # train.jsonl beside test.jsonl
               else os.path.relpath(os.path.dirname(f), root))
        out.setdefault(key, []).append(f)
    return out


def _arrow_files(folder: str) -> list[str]:
    """The Arrow files of a ``save_to_disk`` folder, in the order its ``state.json`` lists them."""
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder}/state.json: not a datasets save_to_disk state ({exc})") from None
    names = names or sorted(p.name for p in Path(folder).glob("*.arrow"))
    if not names:
        raise ValueError(f"{folder}: a datasets save_to_disk folder without .arrow files")
    return [os.path.join(folder, name) for name in names]


def container_of(path: str, requested: str = "auto") -> str:
    """The container of one file: ``requested``, or recognised from its name and first bytes."""
    if requested != "auto":
        return requested
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):  # an Arrow IPC file, or stream (datasets' .arrow files)
        return "arrow"
    kind = _SUFFIXES.get(Path(path).suffix.lower())
    if kind in ("csv", "tsv", "parquet", "arrow"):
        return kind
    return "json" if is_json_array(path) else "jsonl"  # by content, whatever the name says (as before)


# ---------------------------------------------------------------------------------------------
# Columns
# ---------------------------------------------------------------------------------------------


def check_columns(columns: dict[str, str]) -> list[str]:
    """Problems with a ``--columns`` mapping's canonical names (each names the known ones)."""
    problems = []
    for canonical, column in columns.items():
        if canonical not in COLUMNS:
            near = difflib.get_close_matches(canonical, list(COLUMNS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            problems.append(f"columns: {canonical!r}{hint} is not a field a layout reads; those are "
                            f"{', '.join(COLUMNS)} (--columns FIELD=YOUR_COLUMN)")
        if not isinstance(column, str) or not column:
            problems.append(f"columns: {canonical}={column!r}: name a column")
    return problems


def column_names(source: InputFile, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> list[str]:
    """The columns of a file: its header or schema, or (JSON) the keys of its first readable record."""
    if source.container == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(source.path).names)
    if source.container == "arrow":
        return list(_arrow_table(source.path).schema.names)
    if source.container in TEXT_CONTAINERS:
        return _csv_header(source)[0]
    record = first_record(source, max_record_bytes)
    return sorted(record) if record is not None else []


def _guess_mapping(columns: list[str]) -> str:
    """An example ``--columns`` for these columns: a prompt-like and a response-like one, where named so."""
    def pick(words: tuple[str, ...], taken: str = "") -> str:
        for word in words:
            for column in columns:
                if column != taken and word in column.lower():
                    return column
        return ""

    prompt = pick(("instruction", "prompt", "question", "query", "input", "problem"))
    response = pick(("output", "response", "answer", "completion", "solution", "chosen", "target"), prompt)
    def quote(column: str) -> str:
        return f"'{column}'" if re.search(r"[^\w.-]", column) else column

    return f"instruction={quote(prompt or '<prompt column>')},output={quote(response or '<response column>')}"


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def iter_records(source: InputFile, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, Any]]:
    """``(position, raw)`` for every record of a file, streamed: raw is JSONL bytes, a dict, an
    :class:`OversizedRecord` or a :class:`RecordError` (a row that cannot be read: ``parse_record`` raises it)."""
    if source.container in ("json", "jsonl"):
        yield from iter_raw_records(source.path, max_record_bytes)
    elif source.container in TEXT_CONTAINERS:
        header, start, line = _csv_header(source, max_record_bytes)
        yield from _csv_records(source, header, (start, None), line, max_record_bytes)
    else:
        yield from read_rows(source, 0, None)


def first_record(source: InputFile, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> dict[str, Any] | None:
    """The first record of a file that reads as a JSON object (or row), or None."""
    for _, raw in iter_records(source, max_record_bytes):
        if isinstance(raw, (OversizedRecord, RecordError)):
            continue
        try:
            record = json.loads(raw) if isinstance(raw, bytes) else raw
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            return record
    return None


def has_records(source: InputFile, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> bool:
    """Whether a file holds any record at all (good or bad)."""
    if source.container in TABLE_CONTAINERS:
        return row_count(source) > 0
    return next(iter(iter_records(source, max_record_bytes)), None) is not None


def detect_layout(source: InputFile, requested: str, columns: dict[str, str] | None,
                  max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> str:
    """The record layout of a file: ``requested``, or (``auto``) recognised from its first record's fields
    after ``columns``. ValueError naming the layouts, the fields each reads, and the columns seen, when it
    cannot tell; or naming the column a mapping asks for that a CSV, TSV, Parquet or Arrow file does not have."""
    seen: list[str] | None = None
    if columns and source.container not in ("json", "jsonl"):  # (JSON records' keys vary: a record lacking one is a reject)
        seen = column_names(source, max_record_bytes)
        for canonical, column in columns.items():
            if seen and column not in seen:
                near = difflib.get_close_matches(column, seen, n=1, cutoff=0.6)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"{source.path}: --columns {canonical}={column}: no column {column!r}{hint}; "
                                 f"its columns: {seen}")
    if requested != "auto":
        return requested
    record = first_record(source, max_record_bytes)
    if record is not None:
        try:
            mapped = map_columns(record, columns)
            for key in ("messages", "conversations"):  # JSON text in a CSV cell or a string column
                if isinstance(mapped.get(key), str) and mapped[key].lstrip().startswith("["):
                    try:
                        mapped[key] = json.loads(mapped[key])
                    except (ValueError, RecursionError):
                        pass
            return detect_format(mapped)
        except ValueError:
            pass
        seen = list(record) if source.container in ("json", "jsonl") else (seen or column_names(source, max_record_bytes))
    else:
        seen = seen if seen is not None else []
    layouts = "\n".join(f"    {name:<9} {fields}" for name, fields in LAYOUTS.items())
    what = f"from its columns {seen}" if record is not None else "(no readable record)"
    raise ValueError(
        f"{source.path} ({source.container}): cannot tell the record layout (--format auto) {what}. The layouts and "
        f"the fields each reads:\n{layouts}\n  Name your columns with --columns FIELD=COLUMN,... (e.g. --columns "
        f"{_guess_mapping(seen)}) and/or pass --format {'|'.join(FORMATS)}.")


# -- CSV / TSV ------------------------------------------------------------------------------------


class _LineFeed:
    """The lines of a binary file for ``csv.reader``, decoded, counting lines and bytes, so that every row
    has its first line and byte range. A line over the limit is not read whole (``read_lines``): the row
    holding it is an :class:`OversizedRecord`; invalid UTF-8 makes the row an ``invalid_utf8`` reject."""

    def __init__(self, f: BinaryIO, offset: int, line: int, max_bytes: int, end: int | None):
        self.lines = read_lines(f, max_bytes)
        self.offset, self.line, self.end = offset, line, end
        self.start: tuple[int, int] | None = None  # (offset, line) of the row being read
        self.oversized = self.bad_utf8 = False

    def __iter__(self) -> _LineFeed:
        return self

    def __next__(self) -> str:
        if self.end is not None and self.offset >= self.end and self.start is None:
            raise StopIteration
        item, size = next(self.lines)
        if self.start is None:
            self.start = (self.offset, self.line)
        first = self.offset == 0
        self.offset += size
        self.line += 1
        if isinstance(item, OversizedRecord):
            self.oversized = True
            return "\n"
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            self.bad_utf8 = True
            text = item.decode("utf-8", "replace")
        return text[1:] if first and text.startswith("\ufeff") else text


def _csv_rows(f: BinaryIO, container: str, offset: int, line: int, max_bytes: int,
              end: int | None = None) -> Iterator[tuple[int, int, int, list[str] | OversizedRecord | RecordError]]:
    """``(first line, start byte, end byte, row)`` for each row from ``offset`` (blank lines skipped)."""
    f.seek(offset)
    feed = _LineFeed(f, offset, line, max_bytes, end)
    csv.field_size_limit(max(max_bytes, 1 << 17))
    reader = csv.reader(feed, delimiter=_DELIMITERS[container])
    while True:
        feed.start, feed.oversized, feed.bad_utf8 = None, False, False
        try:
            row: Any = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if feed.start is None:
                return
            too_large = "field larger than field limit" in str(exc)
            row = (RecordError("record_too_large", f"a field over max_record_bytes {max_bytes:,} (raise --max-record-bytes "
                               f"to read it)") if too_large else RecordError("malformed_csv", str(exc)))
        if feed.start is None or row == []:
            continue  # a blank line
        start, first = feed.start
        if feed.oversized:
            row = OversizedRecord(feed.offset - start, max_bytes)
        elif feed.bad_utf8 and not isinstance(row, RecordError):
            row = RecordError("invalid_utf8", "invalid UTF-8 in the row")
        yield first, start, feed.offset, row


def _csv_header(source: InputFile, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> tuple[list[str], int, int]:
    """(column names, byte where the rows start, the line they start on); ValueError when there is none."""
    with open(source.path, "rb") as f:
        for first, _, end, row in _csv_rows(f, source.container, 0, 1, max_record_bytes):
            if not isinstance(row, list):
                raise ValueError(f"{source.path}:{first}: the {source.container.upper()} header cannot be read ({row})")
            twice = sorted({c for c in row if row.count(c) > 1})
            if twice:
                raise ValueError(f"{source.path}:{first}: the header names {twice} more than once")
            f.seek(0)
            return row, end, f.read(end).count(b"\n") + 1
    raise ValueError(f"{source.path}: an empty {source.container.upper()} file (no header line)")


def _csv_records(source: InputFile, header: list[str], span: tuple[int, int | None], line: int,
                 max_record_bytes: int) -> Iterator[tuple[int, Any]]:
    with open(source.path, "rb") as f:
        for first, _, _, row in _csv_rows(f, source.container, span[0], line, max_record_bytes, span[1]):
            yield first, _csv_record(header, row)


def _csv_record(header: list[str], row: Any) -> Any:
    if not isinstance(row, list):
        return row
    if len(row) != len(header):
        return RecordError("malformed_csv", f"{len(row)} fields, the header has {len(header)} (a field holding the "
                                            f"delimiter or a line break must be quoted)")
    return dict(zip(header, row))


def csv_segments(source: InputFile, shard_size: int, limit: int,
                 max_record_bytes: int) -> Iterator[tuple[int, int, int, str, tuple[int, int]]]:
    """``(first line, last line, records, sha256, byte range)`` per shard of ``shard_size`` rows."""
    header, start, line = _csv_header(source, max_record_bytes)
    count, chunk = 0, []
    with open(source.path, "rb") as f:
        for first, begin, end, row in _csv_rows(f, source.container, start, line, max_record_bytes):
            if limit and count >= limit:
                break
            count += 1
            chunk.append((first, begin, end, repr(row) if not isinstance(row, list) else json.dumps(row, ensure_ascii=False)))
            if len(chunk) == shard_size:
                yield _segment(chunk)
                chunk = []
    if chunk:
        yield _segment(chunk)


def _segment(chunk: list[tuple[int, int, int, str]]) -> tuple[int, int, int, str, tuple[int, int]]:
    digest = hashlib.sha256("\n".join(text for *_, text in chunk).encode("utf-8", "surrogatepass")).hexdigest()
    return chunk[0][0], chunk[-1][0], len(chunk), digest, (chunk[0][1], chunk[-1][2])


def read_csv_span(source: InputFile, span: tuple[int, int], first_line: int,
                  max_record_bytes: int) -> Iterator[tuple[int, Any]]:
    """The records of one shard of a CSV / TSV file: its byte range, numbered from its first line."""
    header, _, _ = _csv_header(source, max_record_bytes)
    yield from _csv_records(source, header, span, first_line, max_record_bytes)


# -- Parquet / Arrow ------------------------------------------------------------------------------

BATCH_ROWS = 1024  # rows converted to Python at a time


def _arrow_table(path: str) -> Any:
    """An Arrow IPC file or stream (datasets writes streams), memory-mapped: rows are read on access."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source).read_all()


def row_count(source: InputFile) -> int:
    if source.container == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(source.path).metadata.num_rows
    return _arrow_table(source.path).num_rows


def read_rows(source: InputFile, start: int, end: int | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row index, record)`` for rows ``[start, end)`` of a Parquet or Arrow file, a batch at a time: Parquet
    reads only the row groups holding them; Arrow is memory-mapped."""
    if source.container == "arrow":
        table = _arrow_table(source.path)
        stop = table.num_rows if end is None else min(end, table.num_rows)
        row = start
        for batch in table.slice(start, max(0, stop - start)).to_batches(max_chunksize=BATCH_ROWS):
            for record in batch.to_pylist():
                yield row, record
                row += 1
        return
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(source.path)
    meta = parquet.metadata
    stop = meta.num_rows if end is None else min(end, meta.num_rows)
    groups, first, position = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if position + n > start and position < stop:
            groups.append(g)
            first = position if first is None else first
        position += n
    if not groups:
        return
    row = first
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=groups):
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        if hi > lo:
            for i, record in enumerate(batch.slice(lo, hi - lo).to_pylist()):
                yield row + lo + i, record
        row += batch.num_rows
        if row >= stop:
            return


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, streamed (cached per path, size and mtime within a process)."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def table_segments(source: InputFile, shard_size: int, limit: int) -> Iterator[tuple[int, int, int, str, tuple[int, int]]]:
    """``(first row, last row, records, sha256, row range)`` per shard of ``shard_size`` rows; the digest is the
    file's (a changed file redoes its shards) with the range."""
    n = row_count(source)
    if limit:
        n = min(n, limit)
    whole = file_digest(source.path) if n else ""
    for start in range(0, n, shard_size):
        end = min(start + shard_size, n)
        yield start, end - 1, end - start, hashlib.sha256(f"{whole}:{start}:{end}".encode()).hexdigest(), (start, end)
