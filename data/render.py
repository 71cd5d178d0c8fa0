"""Render chat messages with a model's own chat template into token ids and a loss mask.

One function, :func:`render`, used by annotate and by tests. The loss mask marks every assistant
turn's tokens, its end-of-turn token included, and nothing else (not the template's role headers,
not the newline a template writes after the end-of-turn token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data.formats import Messages, RecordError


@dataclass
class Rendered:
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    text: str
    offsets: np.ndarray  # (n, 2) int64 character spans of each token in ``text``
    truncated: bool = False


def _chat_text(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_of_turn_strings(tokenizer: Any) -> list[str]:
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def assistant_spans(tokenizer: Any, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn in it.

    A span runs from the end of the template's assistant header to the end of the turn's
    end-of-turn token. Needs a template whose renderings of prefixes are text prefixes of the full
    rendering (true of ChatML, Llama 3, Mistral, Gemma ...); others get a clear error.
    """
    text = _chat_text(tokenizer, messages)
    specials = _end_of_turn_strings(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _chat_text(tokenizer, messages[: i + 1])
        if not text.startswith(before) or not text.startswith(upto) or len(upto) < len(before):
            raise RecordError(
                "template_not_prefix_stable",
                "the chat template renders a conversation prefix differently from the full conversation; "
                "loss masks cannot be placed by character offsets",
            )
        start, end = len(before), len(upto)
        # Stop after the last special token (the end-of-turn) in the span: what follows it is template layout.
        segment = text[start:end]
        cut = max((segment.rfind(s) + len(s) for s in specials if s in segment), default=-1)
        if cut > 0:
            end = start + cut
        spans.append((start, end))
    return text, spans


def render(tokenizer: Any, messages: Messages, max_length: int | None = None, overlength: str = "truncate") -> Rendered:
    """Render ``messages`` into ``(input_ids, loss_mask)`` with the tokenizer's chat template.

    ``messages`` of role ``text`` (the plain-text format) are tokenized as they are, every token
    trainable, with the EOS token appended. Over ``max_length`` tokens: ``truncate`` keeps the first
    ``max_length`` tokens, ``drop`` raises RecordError("over_length"). A result with no trainable
    token raises RecordError as well.
    """
    if len(messages) == 1 and messages[0]["role"] == "text":
        eos = tokenizer.eos_token or ""
        text = messages[0]["content"] + eos
        spans = [(0, len(text))]
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; use --format text or a chat model")
        text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = np.asarray(encoded["input_ids"], dtype=np.int32)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    loss_mask = np.zeros(len(input_ids), dtype=bool)
    starts = offsets[:, 0]
    for start, end in spans:
        loss_mask |= (starts >= start) & (starts < end)
    truncated = False
    if max_length is not None and len(input_ids) > max_length:
        if overlength == "drop":
            raise RecordError("over_length", f"{len(input_ids)} tokens > max_length {max_length}")
        input_ids, loss_mask, offsets = input_ids[:max_length], loss_mask[:max_length], offsets[:max_length]
        truncated = True
    if not loss_mask.any():
        reason = "no_trainable_tokens_after_truncation" if truncated else "no_trainable_tokens"
        raise RecordError(reason, "no assistant token left to train on")
    return Rendered(input_ids=input_ids, loss_mask=loss_mask, text=text, offsets=offsets, truncated=truncated)


def token_offsets(tokenizer: Any, input_ids: np.ndarray | list[int]) -> tuple[str, np.ndarray]:
    """Text and per-token character spans for stored ``input_ids`` (no text is stored in shards).

    Decodes and re-encodes with offsets; when the round trip does not give back the same ids it
    falls back to incremental decoding, which is exact for any tokenizer but slower.
    """
    ids = [int(i) for i in input_ids]
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == ids:
        return text, np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    offsets = np.zeros((len(ids), 2), dtype=np.int64)
    previous = 0
    for k in range(len(ids)):
        current = len(tokenizer.decode(ids[: k + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        offsets[k] = (previous, max(previous, current))
        previous = max(previous, current)
    return text, offsets
