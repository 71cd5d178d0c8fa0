"""Importance that a corpus supplies itself: per-message weights and character spans, mapped onto tokens.

Read at tokenize time (annotate/steps.py), where the raw record, its messages, the rendered text and the
token offsets are all at hand, and carried to the ``given`` scorer (annotate/scorers/given.py) as the
staging-only column ``_given``: one float32 per token, NaN where the corpus says nothing (the scorer puts
its ``given.default`` there). Shared code (data/) because it needs the renderer and the record readers.

Fields, on a turn of a ``messages`` or ``sharegpt`` record (other formats carry none):

- a per-message weight under ``weight`` (Mistral's fine-tuning format), ``loss_weight`` (LLaMA-Factory)
  or ``loss_scale`` (ms-swift); a turn may use one of them, or several with the same value;
- ``spans: [{"start": s, "end": e, "value": v}, ...]``: character offsets ``[s, e)`` into that turn's
  content (Python string indices, i.e. code points), each with a value.

Token rule (one rule everywhere): a token belongs to a span / a message when it overlaps the span's /
the message content's characters by at least one character. A token's value is

1. the largest value of the spans it overlaps, if any;
2. else the weight of the message whose content it overlaps, if that message has one;
3. else NaN, i.e. ``given.default`` (template tokens: role headers, end-of-turn tokens, a default
   system prompt the template adds; and content of messages with neither weight nor spans).

Bad values are :class:`~data.formats.RecordError` rejects naming the turn and the field: a weight or
span value that is not a number (booleans included), not finite or negative; spans that are not a list
of objects with integer ``start`` < ``end`` inside the content; overlapping spans; two weight fields
with different values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data.formats import Messages, RecordError

#: The per-message weight fields accepted, in the order they are looked up.
WEIGHT_FIELDS = ("weight", "loss_weight", "loss_scale")
SPANS_FIELD = "spans"
#: The list of turns, per format that can carry given importance.
TURNS_FIELD = {"messages": "messages", "sharegpt": "conversations"}
#: Staging-only column (tokenize -> given scorer): per-token given value, NaN = not given.
GIVEN_COLUMN = "_given"


@dataclass
class GivenTurn:
    """What the corpus says about one turn: its weight (None: none) and its spans ``(start, end, value)``."""

    weight: float | None = None
    spans: list[tuple[int, int, float]] = field(default_factory=list)


def _number(value: Any, where: str) -> float:
    """A non-negative finite number, or a RecordError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError("given_not_numeric", f"{where} = {value!r} is not a number")
    value = float(value)
    if not math.isfinite(value):
        raise RecordError("given_not_finite", f"{where} = {value!r} is not finite")
    if value < 0:
        raise RecordError("given_negative", f"{where} = {value!r} is negative (importance is >= 0)")
    return value


def read_given(record: dict[str, Any], fmt: str, messages: Messages) -> list[GivenTurn] | None:
    """Per turn of ``record`` (aligned with ``messages``, which ``data.formats`` read from it) its given
    weight and spans; None when the format carries none or no turn has any field. Raises RecordError."""
    key = TURNS_FIELD.get(fmt)
    turns = record.get(key) if key else None
    if not isinstance(turns, list) or not any(
            isinstance(t, dict) and (SPANS_FIELD in t or any(w in t for w in WEIGHT_FIELDS)) for t in turns):
        return None
    if len(turns) != len(messages):  # the readers keep one message per turn; guard against a future reader that does not
        raise RecordError("given_unaligned", f"{len(turns)} turns but {len(messages)} messages: cannot place weights")
    out: list[GivenTurn] = []
    for i, (turn, message) in enumerate(zip(turns, messages)):
        given = GivenTurn()
        weights = {name: _number(turn[name], f"{key}[{i}].{name}") for name in WEIGHT_FIELDS if name in turn}
        if len(set(weights.values())) > 1:
            raise RecordError("given_conflict", f"{key}[{i}] has different weights {weights}")
        if weights:
            given.weight = next(iter(weights.values()))
        if SPANS_FIELD in turn:
            given.spans = _read_spans(turn[SPANS_FIELD], f"{key}[{i}].{SPANS_FIELD}", len(message["content"]))
        out.append(given)
    return out


def _read_spans(spans: Any, where: str, length: int) -> list[tuple[int, int, float]]:
    if not isinstance(spans, list):
        raise RecordError("given_bad_span", f"{where} is {type(spans).__name__}, expected a list of {{start, end, value}}")
    out = []
    for j, span in enumerate(spans):
        at = f"{where}[{j}]"
        if not isinstance(span, dict) or not {"start", "end", "value"} <= set(span):
            raise RecordError("given_bad_span", f"{at} = {span!r}: expected an object with start, end and value")
        start, end = span["start"], span["end"]
        if any(isinstance(x, bool) or not isinstance(x, int) for x in (start, end)):
            raise RecordError("given_bad_span", f"{at}: start {start!r} and end {end!r} must be integers")
        if not 0 <= start < end <= length:
            raise RecordError("given_span_outside", f"{at}: [{start}, {end}) is not inside the content (0 <= start < end <= {length})")
        out.append((start, end, _number(span["value"], f"{at}.value")))
    out.sort()
    for (s0, e0, _), (s1, e1, _) in zip(out, out[1:]):
        if s1 < e0:
            raise RecordError("given_overlapping_spans", f"{where}: spans [{s0}, {e0}) and [{s1}, {e1}) overlap")
    return out


def content_ranges(tokenizer: Any, messages: Messages, text: str, system_prompt: str = "default") -> list[tuple[int, int]]:
    """Character range of each message's content in ``text`` (the full rendering).

    The rendering of ``messages[:i + 1]`` is a prefix of ``text`` (the templates render.py accepts), and
    message i's content is its last occurrence there: only template layout follows it.
    """
    from data.render import _chat_text

    if len(messages) == 1 and messages[0]["role"] == "text":
        return [(0, len(messages[0]["content"]))]
    ranges, previous_end = [], 0
    for i, message in enumerate(messages):
        upto = _chat_text(tokenizer, messages[: i + 1], system_prompt=system_prompt)
        content = message["content"]
        start = upto.rfind(content) if text.startswith(upto) else -1
        if start < previous_end:
            raise RecordError("given_content_not_found", f"turn {i} ({message['role']}): the chat template does not render "
                                                         "the content verbatim, so its character spans cannot be placed")
        ranges.append((start, start + len(content)))
        previous_end = start + len(content)
    return ranges


def token_values(given: list[GivenTurn] | None, ranges: list[tuple[int, int]] | None, offsets: np.ndarray) -> np.ndarray:
    """Per-token given value (float32, NaN = not given) by the module's token rule.

    ``offsets``: ``(n, 2)`` character spans of the tokens in the rendered text; ``ranges``: each message
    content's range in it (:func:`content_ranges`).
    """
    values = np.full(len(offsets), np.nan, dtype=np.float32)
    if given is None:
        return values
    assert ranges is not None
    starts, ends = offsets[:, 0], offsets[:, 1]
    for turn, (c0, c1) in zip(given, ranges):
        if turn.weight is not None:
            values[(starts < c1) & (ends > c0) & (ends > starts)] = turn.weight
    spanned = np.full(len(offsets), np.nan, dtype=np.float32)
    for turn, (c0, _) in zip(given, ranges):
        for s, e, v in turn.spans:
            inside = (starts < c0 + e) & (ends > c0 + s) & (ends > starts)
            # A token straddling two spans gets the larger value (fmax ignores the NaN of "no span yet").
            spanned[inside] = np.fmax(spanned[inside], v)
    # A span overrides its message's weight.
    return np.where(np.isnan(spanned), values, spanned).astype(np.float32)
