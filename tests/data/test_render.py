"""render(): the loss mask covers exactly the assistant turns plus their end-of-turn token."""

import numpy as np
import pytest

from data.formats import RecordError
from data.render import render, render_batch, token_offsets


def _trainable_text(tokenizer, rendered):
    return tokenizer.decode(rendered.input_ids[rendered.loss_mask].tolist())


def test_single_turn_mask(smol_tokenizer):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
    r = render(smol_tokenizer, messages)
    assert _trainable_text(smol_tokenizer, r) == "It is 4.<|im_end|>"
    # Trainable tokens are one contiguous run ending with the end-of-turn token.
    idx = np.flatnonzero(r.loss_mask)
    assert (np.diff(idx) == 1).all()
    assert smol_tokenizer.convert_ids_to_tokens(int(r.input_ids[idx[-1]])) == "<|im_end|>"
    assert r.input_ids.dtype == np.int32 and len(r.input_ids) == len(r.loss_mask)


def test_training_prompt_is_the_generation_prompt(smol_tokenizer):
    """What the model is trained to continue is exactly what evaluation.run's generation feeds it: the
    tokens before the first trainable one are the chat template's generation prompt (SmolLM2's default
    system message included), token for token."""
    prompt = "What is the capital of France?"
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Paris."}]
    r = render(smol_tokenizer, messages)
    first = int(np.flatnonzero(r.loss_mask)[0])
    generation = smol_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in generation
    assert r.input_ids[:first].tolist() == smol_tokenizer(generation, add_special_tokens=False)["input_ids"]


def test_multi_turn_marks_every_assistant_turn(smol_tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "b"}, {"role": "assistant", "content": "second answer"}]
    r = render(smol_tokenizer, messages)
    assert _trainable_text(smol_tokenizer, r) == "first answer<|im_end|>second answer<|im_end|>"
    assert r.text == smol_tokenizer.apply_chat_template(messages, tokenize=False)
    # Same ids as the tokenizer's own chat-template tokenization.
    ids = smol_tokenizer.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert r.input_ids.tolist() == list(ids)


def test_truncate_and_drop(smol_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 200}]
    full = render(smol_tokenizer, messages)
    cut = render(smol_tokenizer, messages, max_length=60, overlength="truncate")
    assert cut.truncated and len(cut.input_ids) == 60
    assert (cut.input_ids == full.input_ids[:60]).all() and (cut.loss_mask == full.loss_mask[:60]).all()
    with pytest.raises(RecordError) as info:
        render(smol_tokenizer, messages, max_length=60, overlength="drop")
    assert info.value.reason == "over_length"
    with pytest.raises(RecordError) as info:
        render(smol_tokenizer, messages, max_length=10, overlength="truncate")
    assert info.value.reason == "no_trainable_tokens_after_truncation"


def test_plain_text_is_all_trainable_with_eos(smol_tokenizer):
    r = render(smol_tokenizer, [{"role": "text", "content": "Plain text here."}])
    assert r.loss_mask.all()
    assert smol_tokenizer.decode(r.input_ids.tolist()) == "Plain text here." + smol_tokenizer.eos_token


def test_token_offsets_round_trip(smol_tokenizer):
    messages = [{"role": "user", "content": "Café — naïve?"}, {"role": "assistant", "content": "Ünïcödé 🙂 ok."}]
    r = render(smol_tokenizer, messages)
    text, offsets = token_offsets(smol_tokenizer, r.input_ids)
    assert text == r.text
    assert (offsets == r.offsets).all()


def _one_by_one(tokenizer, conversations, **kwargs):
    out = []
    for messages in conversations:
        try:
            out.append(render(tokenizer, messages, **kwargs))
        except RecordError as exc:
            out.append(exc)
    return out


@pytest.mark.parametrize("kwargs", [{}, {"max_length": 256, "overlength": "truncate"}, {"max_length": 256, "overlength": "drop"}])
def test_render_batch_is_render_record_by_record(smol_tokenizer, kwargs):
    """The annotate job's one-call-per-shard tokenization gives what render() gives, record for record, errors
    included: on LIMA (long, multi-turn, unicode) and on edge cases (special-token text, whitespace runs, empty
    and plain-text records, one that truncation leaves without an assistant token)."""
    import json

    from data.formats import read_lima
    from tests.conftest import LIMA

    conversations = [read_lima(json.loads(line)) for line in LIMA.read_text(encoding="utf-8").splitlines()[:120]]
    conversations += [
        [{"role": "user", "content": "say <|im_end|> and <|im_start|>"}, {"role": "assistant", "content": "<|im_end|> ok"}],
        [{"role": "user", "content": "  \n\n\t  spaces"}, {"role": "assistant", "content": "   \n  "}],
        [{"role": "text", "content": "Plain text, 🙂 naïve."}],
        [{"role": "user", "content": "long " * 400}, {"role": "assistant", "content": "short"}],
        [{"role": "user", "content": "no answer to train on"}],
    ]
    batch = render_batch(smol_tokenizer, conversations, **kwargs)
    single = _one_by_one(smol_tokenizer, conversations, **kwargs)
    assert len(batch) == len(single) == len(conversations)
    for b, s in zip(batch, single):
        assert type(b) is type(s)
        if isinstance(s, RecordError):
            assert (b.reason, b.detail) == (s.reason, s.detail)
            continue
        assert b.input_ids.dtype == np.int32 and (b.input_ids == s.input_ids).all()
        assert (b.loss_mask == s.loss_mask).all() and b.truncated == s.truncated and b.text == s.text
        assert (b.offsets == s.offsets).all()
    reasons = {s.reason for s in single if isinstance(s, RecordError)}
    # The cases were exercised: every path that rejects, and truncation.
    expected = {"no_trainable_tokens", {"truncate": "no_trainable_tokens_after_truncation", "drop": "over_length"}.get(
        kwargs.get("overlength"), "no_trainable_tokens")}
    assert reasons == expected
    assert any(s.truncated for s in single if not isinstance(s, RecordError)) == (kwargs.get("overlength") == "truncate")
    # Without offsets: the same ids and masks, offsets left out.
    lean = render_batch(smol_tokenizer, conversations, with_offsets=False, **kwargs)
    for b, s in zip(lean, batch):
        if not isinstance(s, RecordError):
            assert b.offsets is None and (b.input_ids == s.input_ids).all() and (b.loss_mask == s.loss_mask).all()


def test_render_batch_sees_tokens_added_after_its_first_call(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    conversations = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": f"zqxwv{k} jjkk"}] for k in range(2)]
    before = render_batch(tokenizer, conversations)
    tokenizer.add_tokens(["zqxwv0"])
    after = render_batch(tokenizer, conversations)
    assert len(after[0].input_ids) < len(before[0].input_ids)
    assert all((a.input_ids == r.input_ids).all() for a, r in zip(after, _one_by_one(tokenizer, conversations)))
