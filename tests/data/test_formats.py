"""Corpus readers: every format yields the right messages; bad records raise RecordError with a reason."""

import json

import pytest

from data.formats import RecordError, detect_format, iter_raw_records, parse_record


def test_alpaca_joins_instruction_and_input():
    messages, _ = parse_record(json.dumps({"instruction": "Add", "input": "1 and 2", "output": "3"}), "alpaca")
    assert messages == [{"role": "user", "content": "Add\n\n1 and 2"}, {"role": "assistant", "content": "3"}]


def test_lima_multi_turn_alternates_roles():
    messages, _ = parse_record(json.dumps({"conversations": ["q1", "a1", "q2", "a2"]}), "lima")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages] == ["q1", "a1", "q2", "a2"]


def test_messages_and_sharegpt():
    m, _ = parse_record({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "a"}]}, "messages")
    assert [x["role"] for x in m] == ["system", "user", "assistant"]
    s, _ = parse_record({"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}, "sharegpt")
    assert s == [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]


def test_text_format():
    m, _ = parse_record({"text": "hello"}, "text")
    assert m == [{"role": "text", "content": "hello"}]


@pytest.mark.parametrize(
    "raw, fmt, reason",
    [
        (b'{"instruction": "x", "output": ', "alpaca", "malformed_json"),
        (b'{"instruction": "x"}', "alpaca", "missing_field"),
        (b'{"instruction": 3, "output": "y"}', "alpaca", "wrong_type"),
        (b'{"instruction": "x", "output": "  "}', "alpaca", "empty_response"),
        (b'{"conversations": ["q"]}', "lima", "no_response"),
        (b'{"conversations": ["q", "a", "q2"]}', "lima", "ends_with_user"),
        (b'{"conversations": "qa"}', "lima", "wrong_type"),
        (b'{"messages": [{"role": "bot", "content": "a"}]}', "messages", "unknown_role"),
        (b'{"text": "\xff\xfe bad"}', "text", "invalid_utf8"),
        (b'[1, 2]', "alpaca", "wrong_type"),
    ],
)
def test_bad_records_have_reasons(raw, fmt, reason):
    with pytest.raises(RecordError) as info:
        parse_record(raw, fmt)
    assert info.value.reason == reason


def test_detect_format():
    assert detect_format({"conversations": ["a", "b"]}) == "lima"
    assert detect_format({"conversations": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert detect_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert detect_format({"messages": []}) == "messages"
    assert detect_format({"text": "t"}) == "text"


def test_raw_records_jsonl_lines_and_json_array(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"text": "a"}\n\n{"text": "b"}\n')
    assert [line for line, _ in iter_raw_records(str(jsonl))] == [1, 3]
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [(line, raw["text"]) for line, raw in iter_raw_records(str(array))] == [(1, "a"), (2, "b")]
    broken = tmp_path / "c.json"
    broken.write_text('[{"text": "a"},')
    with pytest.raises(ValueError, match="c.json"):
        list(iter_raw_records(str(broken)))


@pytest.mark.parametrize(
    "line, detail",
    [
        # The line's own newline made json say "line 2 column 1": the error is at the end of the line.
        (b'{"conversations": ["broken"\n', "Expecting ',' delimiter at column 28 (the line ends there: the record is cut short)"),
        (b'{"conversations": ["a",, "b"]}\n', "Expecting value at column 24"),
        (b'{"conversations": ["a", "b"]} x\r\n', "Extra data at column 31"),
    ],
)
def test_malformed_json_names_the_column_of_the_error_in_its_line(line, detail):
    with pytest.raises(RecordError) as info:
        parse_record(line, "lima")
    assert (info.value.reason, info.value.detail) == ("malformed_json", detail)
