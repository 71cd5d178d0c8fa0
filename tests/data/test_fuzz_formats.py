"""Fuzzing the corpus readers and render: thousands of generated and mutated records per format, each
accepted or rejected with a reason (RecordError), never another exception; huge lines are rejected
without being read whole."""

from __future__ import annotations

import json
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.formats import FORMATS, OversizedRecord, RecordError, iter_raw_records, parse_record
from data.render import render

EXAMPLES = 2000  # per format (issue 16: >= 2,000 in CI)

# Text with what breaks naive code: NUL, control characters, lone surrogates, RTL marks, emoji, long runs.
text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=()), max_size=40),
    st.sampled_from(["", " ", "\x00", "\ud800", "\udfff x", "a\u202eb", "<|im_end|>", "<|im_start|>assistant\n", "\r\n" * 5]),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), text)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
                          max_leaves=12)
role = st.one_of(st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", ""]), json_value)


# Words that survive render (non-empty after stripping), for the well-formed conversations below.
word = st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=20)


def conversation(role_key: str, content_key: str, user: str, assistant: str) -> st.SearchStrategy:
    """A well-formed conversation (1-2 exchanges): without it, whether any random record is valid would
    depend on the draw, and the accepted path might go untested (it did once: 0 of 2,000 accepted)."""
    exchange = st.tuples(word, word).map(lambda pair: [{role_key: user, content_key: pair[0]},
                                                        {role_key: assistant, content_key: pair[1]}])
    return st.lists(exchange, min_size=1, max_size=2).map(lambda exchanges: [turn for ex in exchanges for turn in ex])


def shaped(fmt: str) -> st.SearchStrategy:
    """Records close to the format (so deep paths are reached), with any field possibly wrong."""
    if fmt == "alpaca":
        return st.fixed_dictionaries({"instruction": st.one_of(text, json_value), "output": st.one_of(text, json_value)},
                                     optional={"input": st.one_of(text, json_value), "system": st.one_of(text, json_value)})
    if fmt == "lima":
        return st.fixed_dictionaries({"conversations": st.one_of(st.lists(text, max_size=6), json_value)})
    if fmt == "messages":
        turn = st.one_of(st.fixed_dictionaries({"role": role, "content": st.one_of(text, json_value)}), json_value)
        return st.fixed_dictionaries({"messages": st.one_of(conversation("role", "content", "user", "assistant"),
                                                            st.lists(turn, max_size=5), json_value)})
    if fmt == "sharegpt":
        turn = st.one_of(st.fixed_dictionaries({"from": role, "value": st.one_of(text, json_value)}), json_value)
        return st.fixed_dictionaries({"conversations": st.one_of(conversation("from", "value", "human", "gpt"),
                                                                 st.lists(turn, max_size=5), json_value)})
    return st.fixed_dictionaries({"text": st.one_of(text, json_value)})


def mutate(line: bytes, data: st.DataObject) -> bytes:
    """Byte-level damage to a serialised record: flips, cuts, insertions (invalid UTF-8, NUL, braces)."""
    out = bytearray(line)
    for _ in range(data.draw(st.integers(0, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(out) - 1)))
        if op == "flip" and out:
            out[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del out[at:at + data.draw(st.integers(1, 8))]
        else:
            out[at:at] = data.draw(st.sampled_from([b"\x00", b"\xff\xfe", b"\xc3", b"{", b"]", b'"', b"\\u", b"\n"]))
    return bytes(out)


def record_line(fmt: str, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["shaped", "shaped", "any", "mutated", "nested"]))
    if kind == "nested":  # deep nesting: json's recursion limit must become a rejection
        depth = data.draw(st.integers(10, 100_000))
        return (b"[" * depth + b"]" * depth) if data.draw(st.booleans()) else (b'{"a":' * depth + b"1" + b"}" * depth)
    value = data.draw(shaped(fmt)) if kind != "any" else data.draw(json_value)
    line = json.dumps(value, ensure_ascii=data.draw(st.booleans())).encode("utf-8", "surrogatepass")
    return mutate(line, data) if kind == "mutated" else line


@pytest.fixture(scope="module")
def tokenizer(smol_tokenizer):
    return smol_tokenizer


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_record_is_accepted_or_rejected_with_a_reason(fmt, tokenizer):
    outcomes = {"accepted": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(st.data())
    def check(data):
        line = record_line(fmt, data)
        try:
            messages, _ = parse_record(line, fmt)
            rendered = render(tokenizer, messages, max_length=256, overlength="truncate")
        except RecordError as exc:
            assert exc.reason and exc.detail
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
            return
        assert len(rendered.input_ids) == len(rendered.loss_mask) <= 256
        outcomes["accepted"] += 1

    check()
    assert sum(outcomes.values()) >= EXAMPLES
    assert outcomes["accepted"] > 0 and len(outcomes) > 3, outcomes  # both paths were exercised


def test_a_huge_line_is_rejected_without_being_read_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    good = json.dumps({"text": "fine"}) + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(good)
        f.write('{"text": "' + "x" * (40 << 20) + '"}\n')  # a 40 MiB line
        f.write(good)
    tracemalloc.start()
    records = list(iter_raw_records(str(path), max_record_bytes=1 << 20))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [n for n, _ in records] == [1, 2, 3]
    assert isinstance(records[1][1], OversizedRecord) and records[1][1].size == (40 << 20) + 13
    assert peak < 8 << 20  # a few MiB of chunks, never the 40 MiB line
    with pytest.raises(RecordError) as exc:
        parse_record(records[1][1], "text")
    assert exc.value.reason == "record_too_large" and "--max-record-bytes" in exc.value.detail
    assert parse_record(records[2][1], "text")[0] == [{"role": "text", "content": "fine"}]


def test_annotate_steps_reject_the_huge_line_at_its_line(tmp_path, tokenizer):
    from annotate import steps

    path = tmp_path / "corpus.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "output": f"answer {i}"}) for i in range(5)]
    rows[2] = json.dumps({"instruction": "big", "output": "y" * (2 << 20)})
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    plans = steps.plan_shards([str(path)], "alpaca", shard_size=2, max_record_bytes=1 << 20)
    assert [(p.first_line, p.last_line) for p in plans] == [(1, 2), (3, 4), (5, 5)]
    tables = [steps.tokenize_shard(p, tokenizer, 256, "truncate", strict=False) for p in plans]
    rejects = [r for _, rs, _ in tables for r in rs]
    assert [(r.line, r.reason) for r in rejects] == [(3, "record_too_large")]
    assert sum(t.num_rows for t, _, _ in tables) == 4
