"""Render chat messages with a model's own chat template into token ids and a loss mask.

One function, :func:`render` (and :func:`render_batch`, the same over many conversations in one tokenizer call), used by annotate and by tests. The loss mask marks every assistant
turn's tokens, its end-of-turn token included, and nothing else (not the template's role headers,
not the newline a template writes after the end-of-turn token).

The system turn is the user's choice (``system_prompt``, annotate's ``--system-prompt``):

- ``default``: the template's own behaviour. Some templates write a system turn by themselves into a
  conversation without one: SmolLM2's ChatML template its "You are a helpful AI assistant named SmolLM,
  trained by Hugging Face" turn, Llama 3.1's a system header with the knowledge cut-off and today's date.
- ``none``: no system turn. Where the template writes one by itself, the conversation is rendered after a
  placeholder system message and that message's whole rendering (the text the template gives the
  conversation of the system message alone) is cut off; a leading BOS token is kept. This is the template's
  own rendering of the remaining turns, checked on a probe to equal the tail of its default rendering; a
  template whose turns are not rendered independently of the system turn (it merges the system text into
  the first user turn, say) or which refuses system messages is refused (:func:`check_system_prompt`). An
  empty system message would not do: ChatML still writes an (empty) system turn for it.
- any other text: that text as the system message.

A record's own system message always wins: it is part of the data, kept as it is under every choice
(``none`` only removes the turn a template adds by itself; a text only fills in for records without one).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from data.formats import Messages, RecordError


@dataclass
class Rendered:
    input_ids: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    text: str
    offsets: np.ndarray | None  # (n, 2) int64 character spans of each token in ``text`` (None: render_batch(with_offsets=False))
    truncated: bool = False


SYSTEM_DEFAULT, SYSTEM_NONE = "default", "none"
_PLACEHOLDER = "sftgo-system-placeholder"  # content of the system message cut off under ``none``
_PROBE = [{"role": "user", "content": "sftgo probe question"}, {"role": "assistant", "content": "sftgo probe answer"}]


def describe_system_prompt(choice: str) -> str:
    """The choice in words, for summaries, cards and refusals: ``default``, ``none`` or ``text "..."``."""
    if choice in (SYSTEM_DEFAULT, SYSTEM_NONE):
        return choice
    shown = choice if len(choice) <= 60 else choice[:57] + "..."
    return f"text {shown!r}"


def _apply(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _lead(tokenizer: Any, alone: str, rest: str) -> str:
    """The BOS token a rendering opens with (Llama 3's ``<|begin_of_text|>``), kept when the system turn ``alone``
    is cut off; not when the turns that follow (``rest``) open with it as well (SmolLM2's BOS is ChatML's
    ``<|im_start|>``: there it opens every turn, not the document)."""
    bos = getattr(tokenizer, "bos_token", None)
    return bos if bos and alone.startswith(bos) and not rest.startswith(bos) else ""


def _cut_system(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    """The template's rendering of ``messages`` with no system turn: rendered after a placeholder system
    message whose own rendering is then cut off (its leading BOS kept)."""
    system = [{"role": "system", "content": _PLACEHOLDER}]
    alone = _apply(tokenizer, system, False)
    full = _apply(tokenizer, system + list(messages), add_generation_prompt)
    if not full.startswith(alone):
        raise RecordError("template_not_prefix_stable", "the chat template renders the system turn differently when turns follow it; "
                                                        "--system-prompt none cannot cut it off")
    rest = full[len(alone):]
    return _lead(tokenizer, alone, rest) + rest


_TEMPLATE_TURNS: "weakref.WeakKeyDictionary[Any, tuple[Any, Any]]" = weakref.WeakKeyDictionary()


def template_system_turn(tokenizer: Any) -> str | None:
    """The system turn the chat template writes by itself into a conversation without a system message
    (its text, e.g. SmolLM2's ``<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by
    Hugging Face<|im_end|>\n``), or None when it writes none.

    Raises ValueError when the template cannot render a conversation without it (see the module docstring)."""
    template = getattr(tokenizer, "chat_template", None)
    cached = _TEMPLATE_TURNS.get(tokenizer)
    if cached is not None and cached[0] == template:
        if isinstance(cached[1], ValueError):
            raise cached[1]
        return cached[1]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    plain = _apply(tokenizer, _PROBE, False)
    try:
        cut = _cut_system(tokenizer, _PROBE, False)
    except Exception as exc:  # noqa: BLE001 - a template raising on a system message (Gemma's)
        result: Any = ValueError(f"the chat template of {name} cannot render a conversation with a system message "
                                 f"({type(exc).__name__}: {exc}): --system-prompt none or a text is not possible with it; "
                                 "use --system-prompt default")
    else:
        rest = _apply(tokenizer, [{"role": "system", "content": _PLACEHOLDER}, *_PROBE], False)[len(_apply(tokenizer, [{"role": "system", "content": _PLACEHOLDER}], False)):]
        lead = cut[: len(cut) - len(rest)]
        if plain == cut:
            result = None
        elif plain.startswith(lead) and plain.endswith(rest) and len(plain) > len(cut):
            result = plain[len(lead): len(plain) - len(rest)]
        else:
            result = ValueError(f"the chat template of {name} does not render the turns after its system turn the same "
                                f"without it (it writes the system text into another turn?): --system-prompt none cannot "
                                f"remove its system turn; use --system-prompt default or a text")
    _TEMPLATE_TURNS[tokenizer] = (template, result)
    if isinstance(result, ValueError):
        raise result
    return result


def template_system_ids(tokenizer: Any) -> tuple[int, list[int]] | None:
    """Where the template's own system turn sits in token ids: ``(tokens before it, its ids)``, read from a
    probe's ids with and without it; None when the template writes no system turn by itself (or cannot do
    without it). What annotate counts to state the share of tokens that turn takes."""
    try:
        if not getattr(tokenizer, "chat_template", None) or template_system_turn(tokenizer) is None:
            return None
    except ValueError:
        return None
    (plain, _), (cut, _) = _encode(tokenizer, [_apply(tokenizer, _PROBE, False), _cut_system(tokenizer, _PROBE, False)], False)
    plain, cut = plain.tolist(), cut.tolist()
    head = next((k for k, (a, b) in enumerate(zip(plain, cut)) if a != b), min(len(plain), len(cut)))
    tail = next((k for k, (a, b) in enumerate(zip(reversed(plain), reversed(cut))) if a != b), min(len(plain), len(cut)))
    tail = min(tail, len(cut) - head)
    return head, plain[head: len(plain) - tail]


def check_system_prompt(tokenizer: Any, choice: str) -> None:
    """ValueError when ``tokenizer``'s chat template cannot render with ``choice`` (annotate's pre-flight)."""
    if not isinstance(choice, str) or not choice:
        raise ValueError(f"system_prompt: {choice!r}: give default, none or the system text")
    if choice == SYSTEM_DEFAULT or not getattr(tokenizer, "chat_template", None):
        return
    if choice == SYSTEM_NONE:
        template_system_turn(tokenizer)
        return
    try:
        _apply(tokenizer, [{"role": "system", "content": choice}, *_PROBE], False)
    except Exception as exc:  # noqa: BLE001
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"system_prompt: the chat template of {name} refuses a system message ({type(exc).__name__}: "
                         f"{exc}); use --system-prompt default") from None


def _chat_text(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False,
               system_prompt: str = SYSTEM_DEFAULT) -> str:
    """The chat template's text of ``messages`` under the system-prompt choice (module docstring)."""
    own = bool(messages) and messages[0]["role"] == "system"
    if own or system_prompt == SYSTEM_DEFAULT:
        return _apply(tokenizer, messages, add_generation_prompt)
    if system_prompt == SYSTEM_NONE:
        if template_system_turn(tokenizer) is None:
            return _apply(tokenizer, messages, add_generation_prompt)
        return _cut_system(tokenizer, messages, add_generation_prompt)
    return _apply(tokenizer, [{"role": "system", "content": system_prompt}, *messages], add_generation_prompt)


def prompt_text(tokenizer: Any, prompt: str, system_prompt: str = SYSTEM_DEFAULT) -> str:
    """A generation prompt: one user turn and the assistant header, under the system-prompt choice (what
    evaluation.run generates from, rendered as training rendered its data)."""
    return _chat_text(tokenizer, [{"role": "user", "content": prompt}], True, system_prompt)


def _end_of_turn_strings(tokenizer: Any) -> list[str]:
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def assistant_spans(tokenizer: Any, messages: Messages, system_prompt: str = SYSTEM_DEFAULT) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character span of each assistant turn in it.

    A span runs from the end of the template's assistant header to the end of the turn's
    end-of-turn token. Needs a template whose renderings of prefixes are text prefixes of the full
    rendering (true of ChatML, Llama 3, Mistral, Gemma ...); others get a clear error.
    """
    text = _chat_text(tokenizer, messages, system_prompt=system_prompt)
    specials = _end_of_turn_strings(tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _chat_text(tokenizer, messages[:i], True, system_prompt) if i else ""
        upto = _chat_text(tokenizer, messages[: i + 1], system_prompt=system_prompt)
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


def _text_and_spans(tokenizer: Any, messages: Messages, system_prompt: str = SYSTEM_DEFAULT) -> tuple[str, list[tuple[int, int]]]:
    """The text to tokenize and its trainable character spans (plain text: all of it, EOS appended)."""
    if len(messages) == 1 and messages[0]["role"] == "text":
        text = messages[0]["content"] + (tokenizer.eos_token or "")
        return text, [(0, len(text))]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')} has no chat template; use --format text or a chat model")
    return assistant_spans(tokenizer, messages, system_prompt)


def _encode(tokenizer: Any, texts: list[str], with_offsets: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int32 ids, token start offsets or (n, 2) offsets) of each text, as ``tokenizer(text,
    add_special_tokens=False)`` gives them.

    Several texts and a fast tokenizer: one call of its Rust backend, on a copy set as a plain call sets
    it (no truncation, no padding, its split_special_tokens). Through ``tokenizer(texts)``, turning every
    encoding into Python lists took longer than the encoding itself.
    """
    if len(texts) < 2 or not getattr(tokenizer, "is_fast", False):
        encoded = [tokenizer(t, add_special_tokens=False, return_offsets_mapping=True) for t in texts]
        return [(np.asarray(e["input_ids"], dtype=np.int32), _offsets(e["offset_mapping"], with_offsets)) for e in encoded]
    backend = _plain_backend(tokenizer)
    return [(np.asarray(e.ids, dtype=np.int32), _offsets(e.offsets, with_offsets)) for e in backend.encode_batch(texts, add_special_tokens=False)]


_BACKENDS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


def _plain_backend(tokenizer: Any) -> Any:
    """The tokenizer's Rust backend, copied once (0.2 s for a 49k vocabulary) and set as a plain call sets it."""
    from tokenizers import Tokenizer

    source = tokenizer.backend_tokenizer
    backend = _BACKENDS.get(tokenizer)
    if backend is None or backend.get_vocab_size(True) != source.get_vocab_size(True):  # tokens added since: copy again
        backend = Tokenizer.from_str(source.to_str())
        backend.no_truncation()
        backend.no_padding()
        _BACKENDS[tokenizer] = backend
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return backend


def _offsets(pairs: Any, with_offsets: bool) -> np.ndarray:
    if with_offsets:
        return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return np.fromiter((start for start, _ in pairs), dtype=np.int64, count=len(pairs))


def _finish(input_ids: np.ndarray, offsets: np.ndarray, text: str, spans: list[tuple[int, int]], max_length: int | None,
            overlength: str, with_offsets: bool) -> Rendered:
    starts = offsets[:, 0] if with_offsets else offsets
    loss_mask = np.zeros(len(input_ids), dtype=bool)
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
    return Rendered(input_ids=input_ids, loss_mask=loss_mask, text=text, offsets=offsets if with_offsets else None,
                    truncated=truncated)


def render(tokenizer: Any, messages: Messages, max_length: int | None = None, overlength: str = "truncate",
           system_prompt: str = SYSTEM_DEFAULT) -> Rendered:
    """Render ``messages`` into ``(input_ids, loss_mask)`` with the tokenizer's chat template.

    ``messages`` of role ``text`` (the plain-text format) are tokenized as they are, every token
    trainable, with the EOS token appended. Over ``max_length`` tokens: ``truncate`` keeps the first
    ``max_length`` tokens, ``drop`` raises RecordError("over_length"). A result with no trainable
    token raises RecordError as well. ``system_prompt``: default, none or a text (module docstring).
    """
    result = render_batch(tokenizer, [messages], max_length, overlength, system_prompt=system_prompt)[0]
    if isinstance(result, RecordError):
        raise result
    return result


def render_batch(tokenizer: Any, conversations: list[Messages], max_length: int | None = None, overlength: str = "truncate",
                 with_offsets: bool = True, system_prompt: str = SYSTEM_DEFAULT) -> list[Rendered | RecordError]:
    """:func:`render` of each conversation, tokenized in one batch: per conversation its Rendered, or the
    RecordError render() would raise. ``with_offsets=False`` leaves ``offsets`` None (faster; the
    annotate job stores only ids and the mask)."""
    results: list[Rendered | RecordError | None] = [None] * len(conversations)
    todo: list[tuple[int, str, list[tuple[int, int]]]] = []
    for k, messages in enumerate(conversations):
        try:
            text, spans = _text_and_spans(tokenizer, messages, system_prompt)
        except RecordError as exc:
            results[k] = exc
            continue
        todo.append((k, text, spans))
    encoded = _encode(tokenizer, [text for _, text, _ in todo], with_offsets) if todo else []
    for (k, text, spans), (input_ids, offsets) in zip(todo, encoded):
        try:
            results[k] = _finish(input_ids, offsets, text, spans, max_length, overlength, with_offsets)
        except RecordError as exc:
            results[k] = exc
    return results  # type: ignore[return-value]


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
