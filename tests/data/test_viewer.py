"""data/shard_stats.py and data/viewer.py against direct computations on the same examples: counts and
statistics over trainable tokens (position 0 excluded), lazy sampling, the training code's groups,
scorer agreement, and the token viewer's HTML (one span per token, groups, escaping)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import data.shard_stats as shard_stats
from data.grouping import corpus_cut, important_mask_sequence, position_keys
from data.shard_stats import (
    corpus_thresholds,
    important_masks,
    sample_examples,
    scan_shards,
    scorer_agreement,
    summarize,
    trainable_tokens,
)
from data.viewer import agreement_html, standalone_page, token_viewer_html
from schemas.shard import EXCESS_LOSS, REJECTS_NAME, Manifest, quantile_from_summary, shard_name
from tests.train.conftest import make_examples, write_annotated_dir

REPO = Path(__file__).resolve().parents[2]
SCORERS = ["tfidf", "base_loss", "ref_loss"]
ALL_SCORES = SCORERS + [EXCESS_LOSS]


def trainable_of(example) -> np.ndarray:
    mask = np.asarray(example["loss_mask"], bool).copy()
    mask[0] = False  # training's rule: position 0 predicts nothing
    return mask


def score_of(example, name) -> np.ndarray:
    if name == EXCESS_LOSS:
        return np.asarray(example["scores"]["base_loss"], np.float32) - np.asarray(example["scores"]["ref_loss"], np.float32)
    return np.asarray(example["scores"][name], np.float32)


def numpy_stats(examples, name) -> dict:
    values = np.concatenate([score_of(ex, name)[trainable_of(ex)] for ex in examples]).astype(np.float64)
    finite = values[np.isfinite(values)]
    p05, p50, p95 = np.quantile(finite, [0.05, 0.5, 0.95])
    return {"count": finite.size, "mean": finite.mean(), "std": finite.std(), "min": finite.min(), "p05": p05,
            "p50": p50, "p95": p95, "max": finite.max(), "nan": int(np.isnan(values).sum()),
            "inf": int(np.isinf(values).sum())}


@pytest.fixture
def tricky(tmp_path):
    """23 examples over 3 shards (row groups of 4); 2 untrainable; example 1 stores loss_mask[0] = True;
    tfidf has one NaN and one +inf at trainable tokens and a NaN at a prompt token."""
    examples = make_examples(23, SCORERS, untrainable=(4, 17), seed=5)
    examples[1]["loss_mask"][0] = True
    t = np.flatnonzero(trainable_of(examples[2]))
    examples[2]["scores"]["tfidf"][t[0]] = np.nan
    examples[3]["scores"]["tfidf"][np.flatnonzero(trainable_of(examples[3]))[-1]] = np.inf
    examples[5]["scores"]["tfidf"][0] = np.nan  # not trainable: ignored
    out = tmp_path / "tricky"
    write_annotated_dir(out, examples, SCORERS, rows_per_shard=9, row_group_size=4)
    return out, examples


@pytest.fixture
def clean(tmp_path):
    examples = make_examples(30, SCORERS, seed=1, max_len=40)
    out = tmp_path / "clean"
    write_annotated_dir(out, examples, SCORERS, rows_per_shard=7, row_group_size=3)
    return out, examples


# --------------------------------------------------------------------------------------------- summary


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the fixture's manifest sketch of a NaN-holding shard
def test_summarize_counts_and_stats_equal_numpy(tricky):
    path, examples = tricky
    s = summarize(str(path))
    assert s["rows"] == 23 and s["shards"] == 3
    assert s["tokens"] == sum(len(ex["input_ids"]) for ex in examples)
    assert s["trainable_tokens"] == sum(int(trainable_of(ex).sum()) for ex in examples)
    # annotate's count takes loss_mask as stored; the stored position 0 of example 1 is the difference.
    assert s["manifest_totals"]["trainable_tokens"] == s["trainable_tokens"] + 1
    assert s["rows_without_trainable"] == 2
    assert s["scorers"] == SCORERS and s["scores"] == ALL_SCORES
    assert s["sources"] == {"test": 23} and s["tokenizer"] == {"name": "t", "sha256": "x"} and s["model"] is None
    for name in ALL_SCORES:
        expected = numpy_stats(examples, name)
        got = s["stats"][name]
        assert set(got) == set(expected)
        assert got["count"] == expected["count"] and got["nan"] == expected["nan"] and got["inf"] == expected["inf"]
        for key in ("mean", "std", "min", "p05", "p50", "p95", "max"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), (name, key)
    assert (s["stats"]["tfidf"]["nan"], s["stats"]["tfidf"]["inf"]) == (1, 1)
    assert s["stats"]["base_loss"]["nan"] == 0
    json.dumps(s, allow_nan=False)  # JSON-ready


def test_quantiles_exact_through_histogram_zoom(tmp_path, monkeypatch):
    """Ties, a huge outlier and a crowded range force the zoom and the read-the-bin paths."""
    rng = np.random.default_rng(0)
    examples = make_examples(12, ["tfidf"], seed=2, min_len=30, max_len=60)
    for i, ex in enumerate(examples):
        values = np.where(rng.random(len(ex["input_ids"])) < 0.3, 0.0, 1.0 + rng.random(len(ex["input_ids"])) * 1e-3)
        if i == 3:
            values[-1] = 1e30
        ex["scores"]["tfidf"] = values.astype(np.float32)
    write_annotated_dir(tmp_path / "d", examples, ["tfidf"], rows_per_shard=5)
    monkeypatch.setattr(shard_stats, "HIST_BINS", 8)
    monkeypatch.setattr(shard_stats, "COLLECT_LIMIT", 5)
    got = summarize(str(tmp_path / "d"))["stats"]["tfidf"]
    expected = numpy_stats(examples, "tfidf")
    for key in ("min", "p05", "p50", "p95", "max"):
        assert got[key] == expected[key], key


def test_summarize_rejects(tmp_path):
    write_annotated_dir(tmp_path / "d", make_examples(4), ["tfidf"])
    manifest = Manifest.load(tmp_path / "d")
    manifest.rejected = {"duplicate": 4, "empty_response": 1}
    manifest.save(tmp_path / "d")
    lines = [{"file": "in.jsonl", "line": n, "reason": "duplicate", "detail": f"dup {n}"} for n in (2, 5, 7, 9)]
    lines.insert(2, {"file": "in.jsonl", "line": 6, "reason": "empty_response", "detail": "no answer"})
    (tmp_path / "d" / REJECTS_NAME).write_text("".join(json.dumps(r) + "\n" for r in lines))
    rejects = summarize(str(tmp_path / "d"))["rejects"]
    assert rejects["total"] == 5 and rejects["by_reason"] == {"duplicate": 4, "empty_response": 1}
    got = [(r["file"], r["line"], r["reason"]) for r in rejects["examples"]]
    # The first three of each reason, in file order.
    assert got == [("in.jsonl", 2, "duplicate"), ("in.jsonl", 5, "duplicate"), ("in.jsonl", 6, "empty_response"),
                   ("in.jsonl", 7, "duplicate")]


def test_missing_or_broken_directories_name_the_path(tmp_path, clean):
    with pytest.raises(ValueError, match="no such directory") as info:
        summarize(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no _manifest.json") as info:
        scan_shards(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "_manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable manifest"):
        summarize(str(tmp_path / "bad"))
    path, _ = clean
    (path / shard_name(1)).write_bytes(b"PAR1 this is not parquet PAR1")
    with pytest.raises(ValueError, match="not a readable Parquet file") as info:
        summarize(str(path))
    assert shard_name(1) in str(info.value)


# --------------------------------------------------------------------------------------------- laziness


def test_the_token_statistics_are_a_projected_parquet_scan(clean):
    path, _ = clean
    lf = scan_shards(str(path))
    import polars as pl

    assert isinstance(lf, pl.LazyFrame)
    plan = trainable_tokens(lf, SCORERS).explain()
    # A scan of the manifest's 5 files reading 4 of 7 columns (loss_mask and 3 scores; not id, source, input_ids).
    assert "Parquet SCAN" in plan and "4 other sources" in plan and "PROJECT 4/7 COLUMNS" in plan


def test_summarize_single_threaded_on_many_shards(tmp_path):
    """Streaming collection with one thread over 40 shards gives the numpy answer (run in a fresh process)."""
    examples = make_examples(120, ["tfidf"], seed=9)
    write_annotated_dir(tmp_path / "many", examples, ["tfidf"], rows_per_shard=3, row_group_size=2)
    code = ("import json, sys; from data.shard_stats import summarize; "
            "print(json.dumps(summarize(sys.argv[1])['stats']['tfidf']))")
    env = {**os.environ, "POLARS_MAX_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "many")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    expected = numpy_stats(examples, "tfidf")
    assert got["count"] == expected["count"]
    for key in ("mean", "std", "min", "p05", "p50", "p95", "max"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9)


def test_sample_reads_only_the_sampled_rows(clean):
    """A shard holding no sampled row can be unreadable: the sample never opens it."""
    path, _ = clean
    first = sample_examples(str(path), n=3, seed=4)
    by_shard = {i // 7 for i in (int(ex["id"].split("-")[1]) for ex in first)}
    untouched = next(i for i in range(5) if i not in by_shard)
    (path / shard_name(untouched)).write_bytes(b"garbage")
    assert sample_examples(str(path), n=3, seed=4) == first


# --------------------------------------------------------------------------------------------- samples


def test_sample_examples_deterministic_and_equal_to_stored(clean):
    path, examples = clean
    by_id = {ex["id"]: ex for ex in examples}
    sample = sample_examples(str(path), n=6, seed=7)
    assert sample == sample_examples(str(path), n=6, seed=7)
    assert len(sample) == 6 and len({ex["id"] for ex in sample}) == 6
    assert [ex["id"] for ex in sample] == sorted(ex["id"] for ex in sample)  # file order
    assert [ex["id"] for ex in sample] != [ex["id"] for ex in sample_examples(str(path), n=6, seed=8)]
    for ex in sample:
        stored = by_id[ex["id"]]
        assert set(ex) == {"id", "source", "input_ids", "loss_mask", "scores"}
        assert ex["source"] == "test"
        assert ex["input_ids"] == stored["input_ids"].tolist()
        assert ex["loss_mask"] == stored["loss_mask"].tolist()
        assert set(ex["scores"]) == set(ALL_SCORES)
        for name in ALL_SCORES:
            assert np.array_equal(np.asarray(ex["scores"][name], np.float32), score_of(stored, name))
    assert len(sample_examples(str(path), n=100)) == 30


def test_sample_examples_by_id(clean):
    path, examples = clean
    got = sample_examples(str(path), ids=["ex-00021", "ex-00002"])
    assert [ex["id"] for ex in got] == ["ex-00021", "ex-00002"]
    assert got[0]["input_ids"] == examples[21]["input_ids"].tolist()
    with pytest.raises(ValueError, match="no example with id nope"):
        sample_examples(str(path), ids=["ex-00001", "nope"])


# --------------------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_important_masks_are_the_training_groups(clean, scope):
    path, _ = clean
    for ex in sample_examples(str(path), n=10, seed=1):
        masks = important_masks(ex, 0.7, scope)
        assert set(masks) == set(ALL_SCORES)
        mask = torch.tensor(trainable_of(ex))
        for name in ALL_SCORES:
            expected = important_mask_sequence(torch.tensor(score_of(ex, name)), mask, 0.7, ex["id"])
            assert masks[name] == expected.tolist()
            assert not masks[name][0]


def test_important_masks_position_zero_never_important():
    ex = {"id": "x", "loss_mask": [True, True, True], "scores": {"s": [100.0, 1.0, 2.0]}}
    assert important_masks(ex, 0.5)["s"] == [False, False, True]  # 2 trainable, top ceil(0.5 * 2) = 1


def test_corpus_scope_uses_the_manifest_threshold(clean):
    path, _ = clean
    manifest = Manifest.load(path)
    thresholds = corpus_thresholds(str(path), 0.6)
    assert set(thresholds) == set(ALL_SCORES)
    for name in ALL_SCORES:
        assert thresholds[name].threshold == quantile_from_summary(manifest.score_stats[name], 0.6)
        assert thresholds[name] == corpus_cut(manifest.score_stats[name], 0.6)
    for ex in sample_examples(str(path), n=5, seed=2):
        masks = important_masks(ex, 0.6, "corpus", thresholds)
        keys = position_keys(ex["id"], np.arange(len(ex["loss_mask"])))
        for name in ALL_SCORES:
            cut, score = thresholds[name], score_of(ex, name).astype(np.float64)
            chosen = (score > cut.threshold) | ((score == cut.threshold) & (keys < cut.tie_fraction))
            assert masks[name] == (chosen & trainable_of(ex)).tolist()
    with pytest.raises(ValueError, match="needs thresholds"):
        important_masks(ex, 0.6, "corpus")


# --------------------------------------------------------------------------------------------- agreement


def test_scorer_agreement_by_hand(tmp_path):
    a1, b1 = [9, 5, 4, 3, 2, 1], [0, 1, 4, 3, 5, 2]  # 5 trainable, rho 0.6: top 2 -> A {1, 2}, B {2, 4}: 1/3
    a2, b2 = [0, 0, 1, 2], [0, 0, 2, 1]  # 2 trainable: top 1 -> A {3}, B {2}: 0
    examples = [
        {"id": "e1", "input_ids": [1] * 6, "loss_mask": [False] + [True] * 5, "scores": {"a": a1, "b": b1, "c": a1}},
        {"id": "e2", "input_ids": [1] * 4, "loss_mask": [False, False, True, True], "scores": {"a": a2, "b": b2, "c": a2}},
        {"id": "e3", "input_ids": [1] * 3, "loss_mask": [True, False, False], "scores": {"a": [1, 2, 3], "b": [1, 2, 3], "c": [1, 2, 3]}},
    ]
    write_annotated_dir(tmp_path / "d", examples, ["a", "b", "c"])
    got = scorer_agreement(str(tmp_path / "d"), 0.6)
    assert got["scores"] == ["a", "b", "c"] and got["examples"] == 2 and got["rho"] == 0.6  # e3: nothing trainable
    overlap = np.array(got["overlap"])
    assert np.allclose(overlap, [[1, 1 / 6, 1], [1 / 6, 1, 1 / 6], [1, 1 / 6, 1]])
    first = scorer_agreement(str(tmp_path / "d"), 0.6, max_examples=1)
    assert first["examples"] == 1 and first["overlap"][0][1] == pytest.approx(1 / 3)
    table = agreement_html(got)
    assert '<table class="agreement"' in table and "0.167" in table


def test_scorer_agreement_with_itself(clean):
    path, _ = clean
    got = scorer_agreement(str(path), 0.7, max_examples=10)
    assert got["examples"] == 10
    assert [got["overlap"][i][i] for i in range(4)] == [1.0] * 4
    assert all(0.0 <= v <= 1.0 for row in got["overlap"] for v in row)


# --------------------------------------------------------------------------------------------- HTML


class Page(HTMLParser):
    """Collects span.tok elements (attributes and text), script elements and all text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tokens: list[dict] = []
        self.scripts = 0
        self.text: list[str] = []
        self._in_tok = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "span" and "tok" in (attrs.get("class") or "").split():
            self.tokens.append({**attrs, "text": ""})
            self._in_tok = True

    def handle_endtag(self, tag):
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_tok:
            self.tokens[-1]["text"] += data


def parse(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


def text_example(tokenizer, text: str, prompt_tokens: int, rng) -> dict:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    mask = [i >= prompt_tokens for i in range(len(ids))]
    base, ref = rng.random(len(ids)).astype(np.float32) * 4, rng.random(len(ids)).astype(np.float32) * 4
    return {"id": "<script>alert(1)</script>", "source": "s&t", "input_ids": ids, "loss_mask": mask,
            "scores": {"tfidf": rng.random(len(ids)).astype(np.float32).tolist(), "base_loss": base.tolist(),
                       "ref_loss": ref.tolist(), EXCESS_LOSS: (base - ref).tolist()}}


def test_viewer_html_tokens_groups_and_escaping(smol_tokenizer):
    rng = np.random.default_rng(0)
    text = "Question: is <script>alert('x')</script> safe?\nAnswer: no & never,\tnot \"ever\"."
    ex = text_example(smol_tokenizer, text, prompt_tokens=4, rng=rng)
    html = token_viewer_html([ex], smol_tokenizer, 0.6, title="T <b>")
    page = parse(standalone_page("page <title>", html))
    assert page.scripts == 1  # only the viewer's own script: neither the id nor the text's <script> injects
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "s&amp;t" in html
    assert "&lt;/" in html  # the text's "</" token, escaped
    assert '<section class="token-viewer">' in html and 'class="score-select"' in html and "T &lt;b&gt;" in html
    n = len(ex["input_ids"])
    assert len(page.tokens) == n
    shown = "".join(t["text"] for t in page.tokens).replace("↵\n", "\n").replace("⇥\t", "\t")
    assert shown == smol_tokenizer.decode(ex["input_ids"]) == text
    masks = important_masks(ex, 0.6)
    trainable = trainable_of(ex)
    for t, tok in enumerate(page.tokens):
        assert tok["title"].startswith(f"id {ex['input_ids'][t]}")
        for name in ALL_SCORES:
            assert float(tok[f"data-score-{name}"]) == pytest.approx(ex["scores"][name][t], rel=1e-5)
            expected = ("1" if masks[name][t] else "0") if trainable[t] else ""
            assert tok[f"data-group-{name}"] == expected
        classes = tok["class"].split()
        assert ("p" in classes) == (not trainable[t])
        assert ("imp" in classes) == masks["tfidf"][t]  # the first score is the one shown without scripts
        assert ("background-color" in tok.get("style", "")) == bool(trainable[t])
    assert "rho = 0.6" in html and "scope sequence" in html


def test_viewer_caps_tokens_and_handles_corpus_scope(smol_tokenizer, clean):
    path, _ = clean
    examples = sample_examples(str(path), n=3, seed=0)
    thresholds = corpus_thresholds(str(path), 0.7)
    html = token_viewer_html(examples, smol_tokenizer, 0.7, "corpus", thresholds, max_tokens=5)
    page = parse(html)
    assert len(page.tokens) == sum(min(5, len(ex["input_ids"])) for ex in examples)
    for ex in examples:
        if len(ex["input_ids"]) > 5:
            assert f"… {len(ex['input_ids']) - 5} more tokens" in html
    groups = [t["data-group-tfidf"] for t in page.tokens]
    expected = [("1" if important_masks(ex, 0.7, "corpus", thresholds)["tfidf"][i] else "0") if trainable_of(ex)[i] else ""
                for ex in examples for i in range(min(5, len(ex["input_ids"])))]
    assert groups == expected
    assert "scope corpus" in html
    # Without a tokenizer the ids are shown.
    assert parse(token_viewer_html(examples[:1], None, 0.7, max_tokens=2)).tokens[0]["text"] == f"#{examples[0]['input_ids'][0]}"


def test_standalone_page_is_complete():
    page = standalone_page("a < b", "<p>x</p>")
    assert page.startswith("<!doctype html>") and "<title>a &lt; b</title>" in page and "<p>x</p>" in page
    assert "http" not in page  # no external resources
    parse(page)
