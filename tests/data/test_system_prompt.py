"""The system turn is the user's choice (data/render.py, annotate --system-prompt): default, none or a text."""

import copy

import numpy as np
import pytest

from data.render import (check_system_prompt, prompt_text, render, render_batch, template_system_ids,
                         template_system_turn)

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_default_keeps_smollm2s_own_system_turn(smol_tokenizer):
    r = render(smol_tokenizer, QA)
    assert r.text.startswith(SMOL_SYSTEM)
    assert r.input_ids.tolist() == _ids(smol_tokenizer, smol_tokenizer.apply_chat_template(QA, tokenize=False))
    assert template_system_turn(smol_tokenizer) == SMOL_SYSTEM


def test_none_leaves_the_template_system_turn_out_token_for_token(smol_tokenizer):
    default, none = render(smol_tokenizer, QA), render(smol_tokenizer, QA, system_prompt="none")
    chatml = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n"
    assert none.text == chatml
    assert none.input_ids.tolist() == _ids(smol_tokenizer, chatml)
    turn = _ids(smol_tokenizer, SMOL_SYSTEM)
    assert len(default.input_ids) - len(none.input_ids) == len(turn) == 21
    # The answer and its mask are the same tokens; only the system turn went.
    assert default.input_ids[default.loss_mask].tolist() == none.input_ids[none.loss_mask].tolist()
    assert default.input_ids[len(turn):].tolist() == none.input_ids.tolist()
    offset, ids = template_system_ids(smol_tokenizer)
    assert default.input_ids[offset: offset + len(ids)].tolist() == ids and len(ids) == 21


def test_a_text_is_the_system_message_and_a_records_own_wins(smol_tokenizer):
    r = render(smol_tokenizer, QA, system_prompt="Answer briefly.")
    assert r.text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    own = [{"role": "system", "content": "You are a calculator."}, *QA]
    expected = smol_tokenizer.apply_chat_template(own, tokenize=False)
    for choice in ("default", "none", "Answer briefly."):
        assert render(smol_tokenizer, own, system_prompt=choice).text == expected, choice


def test_render_batch_and_multi_turn_masks_under_none(smol_tokenizer):
    multi = [*QA, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    batch = render_batch(smol_tokenizer, [QA, multi], system_prompt="none")
    for conversation, r in zip([QA, multi], batch):
        one = render(smol_tokenizer, conversation, system_prompt="none")
        assert r.input_ids.tolist() == one.input_ids.tolist() and (r.loss_mask == one.loss_mask).all()
    trained = smol_tokenizer.decode(batch[1].input_ids[batch[1].loss_mask].tolist())
    assert trained == "It is 4.<|im_end|>6.<|im_end|>"


def test_generation_prompt_matches_the_training_rendering(smol_tokenizer):
    """What evaluate generates from is what training rendered before the answer, under every choice."""
    for choice in ("default", "none", "Answer briefly."):
        r = render(smol_tokenizer, QA, system_prompt=choice)
        first = int(np.flatnonzero(r.loss_mask)[0])
        assert r.input_ids[:first].tolist() == _ids(smol_tokenizer, prompt_text(smol_tokenizer, QA[0]["content"], choice))
    assert "SmolLM" not in prompt_text(smol_tokenizer, "hi", "none")


def test_a_template_with_a_bos_and_a_dated_system_header_keeps_the_bos(smol_tokenizer):
    """Llama 3.1's shape: BOS, then a system header (with a date) written even without a system message."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
        "{{ '<|im_start|>system\\nToday Date: 26 Jul 2024\\n\\n' + sys + '<|im_end|>\\n' }}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    assert template_system_turn(tok) == "<|im_start|>system\nToday Date: 26 Jul 2024\n\n<|im_end|>\n"
    assert render(tok, QA, system_prompt="none").text == (
        "<|endoftext|><|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n")


def test_templates_that_cannot_do_without_or_with_a_system_turn_are_refused(smol_tokenizer):
    merging = copy.deepcopy(smol_tokenizer)  # writes the system text into the first user turn (Mistral's way)
    merging.chat_template = (
        "{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else 'Be nice.' %}"
        "{% for m in messages if m['role'] != 'system' %}{% if loop.first %}{{ '[INST] ' + sys + ' ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="cannot remove its system turn"):
        check_system_prompt(merging, "none")
    check_system_prompt(merging, "Be short.")  # a text is fine: it replaces the default
    refusing = copy.deepcopy(smol_tokenizer)  # Gemma's: no system role at all
    refusing.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}")
    for choice in ("none", "Be short."):
        with pytest.raises(ValueError, match="System role not supported"):
            check_system_prompt(refusing, choice)
    check_system_prompt(refusing, "default")
    check_system_prompt(smol_tokenizer, "none")
