"""Corpus readers: one function per format, each turning a raw record into chat messages.

Every record becomes either ``messages`` (a list of ``{"role", "content"}``) or a :class:`Rejected`
with a reason, so that bad input is counted and logged (file, line, reason), never dropped silently
and never a crash deep inside a library.

Formats:
- ``alpaca``: ``{"instruction", "input", "output"}`` (JSON array or JSONL); optional ``system``.
- ``lima``: ``{"conversations": [user, assistant, user, assistant, ...]}`` (GAIR layout, multi-turn).
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}``.
- ``text``: ``{"text": str}``, plain text trained on in full (no chat template).

A record's own field names may differ: ``columns`` (``--columns instruction=Question,output=Answer``) maps
the layout's fields to them (:func:`map_columns`). A chat layout's turns may also come as JSON text (a
CSV cell, a string column). Which files hold the records (JSONL, JSON, CSV, Parquet, Arrow): data/sources.py.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator

Messages = list[dict[str, str]]
FORMATS = ("alpaca", "lima", "messages", "sharegpt", "text")
#: A JSONL line (or JSON array item) longer than this is rejected as ``record_too_large``, unread.
DEFAULT_MAX_RECORD_BYTES = 8 << 20
_SKIP_CHUNK = 1 << 20


class RecordError(ValueError):
    """A record that cannot be turned into messages; ``reason`` is a short counter name."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class OversizedRecord:
    """Stands in for a record longer than the limit: only its size was read, never its bytes whole."""

    size: int
    limit: int


def read_lines(f: BinaryIO, max_bytes: int) -> Iterator[tuple[bytes | OversizedRecord, int]]:
    """``(line, size in bytes)`` for each line of a binary file. A line longer than ``max_bytes`` is
    skipped in 1 MiB chunks and yielded as :class:`OversizedRecord`, so memory stays bounded."""
    while True:
        line = f.readline(max_bytes + 1)
        if not line:
            return
        if len(line) <= max_bytes or line.endswith(b"\n") and len(line) == max_bytes + 1:
            yield line, len(line)
            continue
        size = len(line)
        while not line.endswith(b"\n"):
            line = f.readline(_SKIP_CHUNK)
            if not line:
                break
            size += len(line)
        yield OversizedRecord(size, max_bytes), size


@dataclass
class Rejected:
    file: str
    line: int  # 1-based line in a JSONL or CSV file (a CSV record's first line), 1-based record number in a
    # JSON array, 0-based row index in a Parquet or Arrow file (see :func:`where`)
    reason: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "reason": self.reason, "detail": self.detail}


#: Containers whose records are rows of a table: a reject's ``line`` is the 0-based row index in its file.
TABLE_SUFFIXES = (".parquet", ".arrow")


def where(file: str, line: int) -> str:
    """A record's place as a reject shows it: ``data.jsonl:12`` (a line, or a JSON array's item number) or
    ``train-00000-of-00001.parquet row 11`` (a Parquet or Arrow row index, 0-based as ``ds[11]``)."""
    return f"{file} row {line}" if str(file).endswith(TABLE_SUFFIXES) else f"{file}:{line}"


def _string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise RecordError("missing_field", f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"field '{key}' is {type(value).__name__}, expected string")
    return value


def _require_response(messages: Messages) -> Messages:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise RecordError("no_response", "no assistant turn")
    for m in assistant:
        if not m["content"].strip():
            raise RecordError("empty_response", "an assistant turn is empty")
    if messages[-1]["role"] != "assistant":
        raise RecordError("ends_with_user", "the conversation ends with a user turn that has no response")
    return messages


def read_alpaca(record: dict) -> Messages:
    instruction = _string(record, "instruction")
    extra = _string(record, "input", required=False)
    output = _string(record, "output")
    system = _string(record, "system", required=False)
    if not instruction.strip():
        raise RecordError("empty_prompt", "field 'instruction' is empty")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": output},
    ]
    return _require_response(messages)


def read_lima(record: dict) -> Messages:
    turns = record.get("conversations")
    if turns is None:
        raise RecordError("missing_field", "missing field 'conversations'")
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise RecordError("wrong_type", "field 'conversations' must be a list of strings (user, assistant, ...)")
    if not turns:
        raise RecordError("empty_conversation", "field 'conversations' is empty")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return _require_response(messages)


_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _read_turns(record: dict, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> Messages:
    turns = record.get(key)
    if turns is None:
        raise RecordError("missing_field", f"missing field '{key}'")
    if not isinstance(turns, list) or not turns:
        raise RecordError("wrong_type", f"field '{key}' must be a non-empty list")
    messages: Messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("wrong_type", f"{key}[{i}] is {type(turn).__name__}, expected object")
        role, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(role, str) or role not in roles:  # (a list or dict role is not even hashable)
            raise RecordError("unknown_role", f"{key}[{i}].{role_key} = {role!r}; expected one of {sorted(roles)}")
        if not isinstance(content, str):
            raise RecordError("wrong_type", f"{key}[{i}].{content_key} must be a string")
        messages.append({"role": roles[role], "content": content})
    return _require_response(messages)


def read_messages(record: dict) -> Messages:
    return _read_turns(record, "messages", "role", "content", _ROLES)


def read_sharegpt(record: dict) -> Messages:
    return _read_turns(record, "conversations", "from", "value", _SHAREGPT_ROLES)


def read_text(record: dict) -> Messages:
    text = _string(record, "text")
    if not text.strip():
        raise RecordError("empty_text", "field 'text' is empty")
    return [{"role": "text", "content": text}]


READERS: dict[str, Callable[[dict], Messages]] = {
    "alpaca": read_alpaca,
    "lima": read_lima,
    "messages": read_messages,
    "sharegpt": read_sharegpt,
    "text": read_text,
}


def detect_format(record: Any) -> str:
    """Guess the format of a record from its keys (used by ``--format auto``)."""
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            turns = record["conversations"]
            return "sharegpt" if isinstance(turns, list) and turns and isinstance(turns[0], dict) else "lima"
        if "instruction" in record:
            return "alpaca"
        if "text" in record:
            return "text"
    raise ValueError(f"cannot tell the corpus format from a record with keys {sorted(record) if isinstance(record, dict) else type(record).__name__}")


def map_columns(record: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    """``record`` with each ``columns`` entry ``canonical: column`` read from ``column`` (a record without
    that column lacks the canonical field: the layout's reader names it, see :func:`_missing_column`)."""
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in columns}
    for canonical, column in columns.items():
        if column in record:
            out[canonical] = record[column]
    return out


def _missing_column(exc: RecordError, columns: dict[str, str] | None) -> RecordError:
    """A reader's ``missing field 'output'`` for a mapped field, told as the column the mapping names."""
    for canonical, column in (columns or {}).items():
        if exc.reason == "missing_field" and exc.detail == f"missing field '{canonical}'":
            return RecordError("missing_field", f"missing column '{column}' (--columns {canonical}={column})")
    return exc


#: The field of a chat layout that holds the turns: a text value there (a CSV cell, a string column) is JSON.
TURNS_FIELDS = {"lima": "conversations", "messages": "messages", "sharegpt": "conversations"}


def _decode_turns(record: dict, fmt: str) -> dict:
    key = TURNS_FIELDS.get(fmt)
    value = record.get(key) if key else None
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return record
    try:
        return {**record, key: json.loads(value)}
    except json.JSONDecodeError as exc:
        raise RecordError("malformed_json", f"field '{key}': {json_error_position(exc)}") from None
    except RecursionError:
        raise RecordError("malformed_json", f"field '{key}': nested too deeply to parse") from None


def parse_record(raw: Any, fmt: str, columns: dict[str, str] | None = None) -> tuple[Messages, dict]:
    """Decode (bytes), parse (JSON text), rename (``columns``: layout field -> the record's column) and read
    one record; raise RecordError when it is bad. ``raw`` may be the RecordError a container's reader gave
    for a row it could not read (a CSV row with too many fields): it is raised."""
    if isinstance(raw, RecordError):
        raise raw
    if isinstance(raw, OversizedRecord):
        raise RecordError("record_too_large", f"{raw.size:,} bytes > max_record_bytes {raw.limit:,} (not read; "
                                              f"raise --max-record-bytes to read it)")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RecordError("malformed_json", json_error_position(exc)) from None
        except RecursionError:  # deeply nested arrays/objects
            raise RecordError("malformed_json", "nested too deeply to parse") from None
    if not isinstance(raw, dict):
        raise RecordError("wrong_type", f"record is {type(raw).__name__}, expected a JSON object")
    raw = _decode_turns(map_columns(raw, columns), fmt)
    try:
        messages = READERS[fmt](raw)
    except RecordError as exc:
        raise _missing_column(exc, columns) from None
    for i, message in enumerate(messages):
        try:  # JSON's "\ud800" escapes decode to lone surrogates: not text, and tokenizers raise on them
            message["content"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RecordError("invalid_unicode", f"turn {i} ({message['role']}): lone surrogate "
                                                 f"U+{ord(message['content'][exc.start]):04X} at character {exc.start}") from None
    return messages, raw


def json_error_position(exc: json.JSONDecodeError) -> str:
    """Where a record's JSON breaks, as its line shows it: ``Expecting ',' delimiter at column 28 (the
    line ends there: the record is cut short)``. The line's own newline is not part of the record: an
    error at the end of the text (json says "line 2 column 1" after it) is at the end of the line."""
    text = exc.doc.rstrip("\r\n")
    pos = min(exc.pos, len(text))
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    where = f"column {column}" if line == 1 else f"line {line} column {column}"
    end = " (the line ends there: the record is cut short)" if pos >= len(text) else ""
    return f"{exc.msg} at {where}{end}"


def is_json_array(path: str) -> bool:
    """True when the file holds one JSON array (Alpaca style) rather than JSON lines."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def iter_raw_records(path: str, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | dict | OversizedRecord]]:
    """Yield ``(line, raw)`` for every record: JSONL lines as bytes, or JSON array items as dicts; a
    record over ``max_record_bytes`` as an :class:`OversizedRecord` (``parse_record`` rejects it).

    Blank lines are skipped (they hold no record). A JSON array that does not parse is a file-level
    error (ValueError naming the file), since no record boundary can be recovered from it; a JSON array
    is parsed whole, so keep huge corpora in JSON lines.
    """
    if is_json_array(path):
        with open(path, "rb") as f:
            try:
                items = json.loads(f.read().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise ValueError(f"{path}: not a valid JSON array ({type(exc).__name__}: {exc}); use JSON lines for "
                                 f"per-record error handling") from None
        for i, item in enumerate(items):
            size = len(json.dumps(item, ensure_ascii=False).encode()) if isinstance(item, (dict, list, str)) else 0
            yield i + 1, (OversizedRecord(size, max_record_bytes) if size > max_record_bytes else item)
        return
    with open(path, "rb") as f:
        for number, (line, _) in enumerate(read_lines(f, max_record_bytes), start=1):
            if isinstance(line, OversizedRecord) or line.strip():
                yield number, line


def source_name(path: str) -> str:
    """The ``source`` a record gets when it does not name one: its file's name."""
    return os.path.basename(path)
