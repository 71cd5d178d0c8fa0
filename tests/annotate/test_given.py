"""The ``given`` scorer: importance the corpus supplies (weights, spans) placed on SmolLM2's real tokens.

Expected values are written out token by token from the rule in data/given.py: a span's value where a
token overlaps it (the largest of several), else the weight of the message whose content it overlaps,
else ``given.default`` (template tokens included).
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from annotate import scorers as registry
from annotate.scorers import ScorerContext
from annotate.steps import plan_shards, tokenize_shard
from data.given import GIVEN_COLUMN
from schemas.shard import INPUT_IDS, LOSS_MASK, score_column

#                  0         1         2         3
#                  01234567890123456789012345678901234567
ANSWER = "Sure. The color of Vorlan is red. Bye."
GOOD = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Color of Vorlan?", "loss_weight": 0.5},
    {"role": "assistant", "content": ANSWER, "loss_scale": 2,
     "spans": [{"start": 29, "end": 32, "value": 1},      # "red"
               {"start": 20, "end": 23, "value": 0.5},    # "orl": tokens "or" and "lan"
               {"start": 23, "end": 24, "value": 0.75}]},  # "a": token "lan" again -> max 0.75
]}
D = 0.25  # given.default in these tests: distinct from every supplied value
# SmolLM2's tokens of GOOD (ChatML) and the value each must get.
EXPECTED = [
    ("<|im_start|>", D), ("system", D), ("\n", D), ("Be", D), (" brief", D), (".", D), ("<|im_end|>", D), ("\n", D),
    ("<|im_start|>", D), ("user", D), ("\n", D),
    ("Color", 0.5), (" of", 0.5), (" V", 0.5), ("or", 0.5), ("lan", 0.5), ("?", 0.5),   # the user turn's loss_weight
    ("<|im_end|>", D), ("\n", D), ("<|im_start|>", D), ("ass", D), ("istant", D), ("\n", D),
    ("Sure", 2.0), (".", 2.0), (" The", 2.0), (" color", 2.0), (" of", 2.0),
    (" V", 2.0),      # chars 18-19 (" V"): ends where the span [20, 23) starts: no overlap, the message weight
    ("or", 0.5),      # chars 20-21: inside [20, 23)
    ("lan", 0.75),    # chars 22-24: overlaps [20, 23) (0.5) and [23, 24) (0.75): the max
    (" is", 2.0),
    (" red", 1.0),    # chars 28-31 (" red") overlap [29, 32) by 3: the span's value, below the message weight
    (".", 2.0), (" By", 2.0), ("e", 2.0), (".", 2.0),
    ("<|im_end|>", D),  # end-of-turn: trainable, but template: the default
    ("\n", D),
]


def _scorer(tokenizer_dir, **options):
    cls = registry.get("given")
    scorer = cls(registry.build_options("given", options), ScorerContext(model=str(tokenizer_dir)))
    scorer.setup()
    return scorer


def _tokenize(tmp_path, tokenizer, records, fmt="messages"):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    plan, = plan_shards([str(path)], fmt, shard_size=100)
    return tokenize_shard(plan, tokenizer, max_length=4096, overlength="truncate", strict=False)


def test_spans_and_message_weights_on_tokens_hand_computed(tmp_path, smol_tokenizer, smol_tokenizer_dir):
    table, rejects, _ = _tokenize(tmp_path, smol_tokenizer, [GOOD])
    assert rejects == []
    scores, = _scorer(smol_tokenizer_dir, default=D).score(table)
    ids = table[INPUT_IDS][0].as_py()
    assert [smol_tokenizer.decode([t]) for t in ids] == [tok for tok, _ in EXPECTED]
    np.testing.assert_array_equal(scores, np.array([v for _, v in EXPECTED], np.float32))
    assert scores.dtype == np.float32
    # Every trainable token has a value (no NaN anywhere), the end-of-turn token the default.
    mask = np.asarray(table[LOSS_MASK][0].as_py())
    assert np.isfinite(scores).all() and scores[mask][-1] == D


def test_default_option_and_records_without_given_fields(tmp_path, smol_tokenizer, smol_tokenizer_dir):
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]}
    table, rejects, _ = _tokenize(tmp_path, smol_tokenizer, [plain, GOOD])
    assert rejects == []
    first, second = _scorer(smol_tokenizer_dir).score(table)  # default 0.0
    assert np.isnan(np.asarray(table[GIVEN_COLUMN][0].as_py(), np.float32)).all()  # the corpus said nothing ...
    np.testing.assert_array_equal(first, np.zeros(len(table[INPUT_IDS][0]), np.float32))  # ... so all default
    np.testing.assert_array_equal(second, np.array([0.0 if v == D else v for _, v in EXPECTED], np.float32))


def test_sharegpt_weight_field_names(tmp_path, smol_tokenizer, smol_tokenizer_dir):
    # Mistral's "weight" on a ShareGPT turn: 0 on the first answer, 3 on the second.
    record = {"conversations": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B.", "weight": 0},
                                {"from": "human", "value": "C?"}, {"from": "gpt", "value": "D.", "weight": 3}]}
    table, rejects, _ = _tokenize(tmp_path, smol_tokenizer, [record], fmt="sharegpt")
    assert rejects == []
    scores, = _scorer(smol_tokenizer_dir, default=-1.0).score(table)
    tokens = [smol_tokenizer.decode([t]) for t in table[INPUT_IDS][0].as_py()]
    got = {i: (tokens[i], float(scores[i])) for i in range(len(tokens)) if scores[i] != -1.0}
    # SmolLM2's template adds its default system prompt (default everywhere); "B" "." -> 0, "D" "." -> 3.
    assert sorted(got.values()) == sorted([("B", 0.0), (".", 0.0), ("D", 3.0), (".", 3.0)])
    assert (scores == -1.0).sum() == len(tokens) - 4


@pytest.mark.parametrize("turn, reason", [
    ({"weight": -1}, "given_negative"),
    ({"loss_weight": "high"}, "given_not_numeric"),
    ({"loss_scale": True}, "given_not_numeric"),
    ({"weight": 1, "loss_weight": 2}, "given_conflict"),
    ({"spans": [{"start": 30, "end": 39, "value": 1}]}, "given_span_outside"),   # content has 38 characters
    ({"spans": [{"start": 5, "end": 5, "value": 1}]}, "given_span_outside"),     # empty
    ({"spans": [{"start": 0, "end": 10, "value": 1}, {"start": 9, "end": 12, "value": 1}]}, "given_overlapping_spans"),
    ({"spans": [{"start": 0, "end": 3, "value": -0.5}]}, "given_negative"),
    ({"spans": [{"start": 0, "end": 3, "value": "1"}]}, "given_not_numeric"),
    ({"spans": [{"start": 0.0, "end": 3, "value": 1}]}, "given_bad_span"),
    ({"spans": [{"start": 0, "end": 3}]}, "given_bad_span"),
    ({"spans": {"start": 0, "end": 3, "value": 1}}, "given_bad_span"),
])
def test_bad_values_are_rejects_with_file_line_and_reason(tmp_path, smol_tokenizer, turn, reason):
    bad = json.loads(json.dumps(GOOD))
    assistant = {"role": "assistant", "content": ANSWER, **turn}
    bad["messages"][2] = assistant
    # Line 1 good, line 2 blank (skipped, still counted), line 3 bad, line 4 good.
    table, rejects, _ = _tokenize(tmp_path, smol_tokenizer, [GOOD, "", bad, {"messages": GOOD["messages"][1:]}])
    assert table.num_rows == 2
    assert [(r.file, r.line, r.reason) for r in rejects] == [(str(tmp_path / "corpus.jsonl"), 3, reason)]
    assert "messages[2]" in rejects[0].detail


def test_nan_infinite_json_values_are_rejected(tmp_path, smol_tokenizer):
    line = json.dumps(GOOD).replace('"loss_scale": 2', '"loss_scale": NaN')
    _, rejects, _ = _tokenize(tmp_path, smol_tokenizer, [line])
    assert [(r.line, r.reason) for r in rejects] == [(1, "given_not_finite")]


@pytest.mark.slow
def test_annotate_job_writes_the_given_column_and_rejects(tmp_path, smol_tokenizer, tiny_llama_dir):
    """Through a real local Ray: the staging column reaches the scorer, never the shard; bad records are
    counted in the manifest and listed in _rejects.jsonl with file and line; --add-scorers given is refused."""
    from annotate.run import main
    from schemas.shard import Manifest

    corpus = tmp_path / "given.jsonl"
    bad = json.loads(json.dumps(GOOD))
    bad["messages"][2]["weight"] = -3
    corpus.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    out = tmp_path / "out"
    assert main(["--input", str(corpus), "--model", str(tiny_llama_dir), "--scorers", "given,tfidf",
                 "--scorer-option", f"given.default={D}", "--output", str(out)]) == 0
    table = pq.read_table(out / "shard-00000.parquet")
    assert GIVEN_COLUMN not in table.column_names and table.num_rows == 1
    np.testing.assert_array_equal(np.asarray(table[score_column("given")][0].as_py(), np.float32),
                                  np.array([v for _, v in EXPECTED], np.float32))
    manifest = Manifest.load(out)
    assert manifest.rejected == {"given_negative": 1}
    rejects = [json.loads(l) for l in (out / "_rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejects] == [(str(corpus), 2, "given_negative")]
    assert main(["--output", str(out), "--model", str(tiny_llama_dir), "--add-scorers", "given"]) == 2


def test_any_json_in_the_given_fields_is_accepted_or_a_given_reject():
    """Fuzz: whatever JSON a corpus puts in weight / loss_weight / loss_scale / spans, read_given either
    accepts it (values finite and >= 0) or raises a RecordError whose reason names the problem."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from data.formats import RecordError
    from data.given import read_given, token_values

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 60), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=3))
    json_value = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                              max_leaves=8)
    span = st.fixed_dictionaries({"start": st.one_of(st.integers(-2, 40), json_value), "end": st.integers(-2, 40),
                                  "value": st.one_of(st.floats(-1, 5), json_value)})
    field = st.sampled_from(["weight", "loss_weight", "loss_scale", "spans"])

    @settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(field, st.one_of(json_value, st.lists(span, max_size=3)))
    def check(name, value):
        messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": ANSWER}]
        record = {"messages": [dict(m) for m in messages]}
        record["messages"][1][name] = value
        try:
            turns = read_given(record, "messages", messages)
        except RecordError as exc:
            assert exc.reason.startswith("given_") and "messages[1]" in exc.detail
            return
        offsets = np.array([[0, 2], [2, 5], [5, 5 + len(ANSWER)]])
        values = token_values(turns, [(0, 2), (5, 5 + len(ANSWER))], offsets)
        assert np.all(np.isnan(values) | (np.isfinite(values) & (values >= 0)))

    check()
