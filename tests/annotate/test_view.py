"""python -m annotate.view: the printed summary, --json, the viewer file, clear exit-2 errors."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from annotate.view import main
from data.shard_stats import summarize
from schemas.shard import MANIFEST_NAME, Manifest, shard_name, tokenizer_fingerprint
from tests.train.conftest import make_examples, write_annotated_dir

REPO = Path(__file__).resolve().parents[2]
SCORERS = ["tfidf", "base_loss", "ref_loss"]


@pytest.fixture
def annotated(tmp_path):
    examples = make_examples(21, SCORERS, seed=3)
    write_annotated_dir(tmp_path / "ann", examples, SCORERS, rows_per_shard=8)
    return tmp_path / "ann", examples


class Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tok = 0
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        self.tok += tag == "span" and "tok" in classes
        self.tables += tag == "table" and "agreement" in classes


def test_prints_totals_stats_and_agreement(annotated, capsys):
    path, examples = annotated
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    tokens = sum(len(ex["input_ids"]) for ex in examples)
    trainable = sum(int(np.asarray(ex["loss_mask"])[1:].sum()) for ex in examples)
    assert "rows              21" in out
    assert f"tokens            {tokens:,}" in out
    assert f"trainable tokens  {trainable:,}" in out
    assert "shards            3" in out
    assert "scorers           tfidf, base_loss, ref_loss" in out and "derived scores    excess_loss" in out
    stats = summarize(str(path))["stats"]
    for name in ("tfidf", "excess_loss"):
        row = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert f"{stats[name]['count']:,}" in row and f"{stats[name]['p50']:.4g}" in row
    assert "rejected records: none" in out
    assert "scorer agreement at rho = 0.7 (sequence scope)" in out and "over 21 examples" in out


def test_json_is_the_summary(annotated, capsys):
    path, _ = annotated
    assert main([str(path), "--json", "--rho", "0.5", "--agreement-examples", "5"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in got.items() if k not in ("agreement", "viewer")} == summarize(str(path))
    assert got["agreement"]["examples"] == 5 and got["agreement"]["rho"] == 0.5 and got["viewer"] is None


def test_writes_the_viewer(annotated, smol_tokenizer_dir, capsys):
    path, examples = annotated
    out_file = path.parent / "views" / "tokens.html"
    assert main([str(path), "--viewer", str(out_file), "--examples", "3", "--tokenizer", str(smol_tokenizer_dir),
                 "--scope", "corpus", "--seed", "2"]) == 0
    captured = capsys.readouterr()
    assert f"viewer: {out_file}" in captured.out
    assert "differs from the one the shards were tokenized with" in captured.err  # the fixture's fingerprint is fake
    page = out_file.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "scope corpus" in page
    spans = Spans()
    spans.feed(page)
    lengths = {ex["id"]: len(ex["input_ids"]) for ex in examples}
    shown = [line.split('data-id="')[1].split('"')[0] for line in page.splitlines() if 'class="tv-example"' in line]
    assert len(shown) == 3 and spans.tok == sum(min(400, lengths[i]) for i in shown)
    assert spans.tables == 1


def test_viewer_tokenizer_from_the_manifest(tmp_path, smol_tokenizer, smol_tokenizer_dir, capsys):
    examples = make_examples(5, ["tfidf"])
    write_annotated_dir(tmp_path / "d", examples, ["tfidf"], tokenizer_fp=tokenizer_fingerprint(smol_tokenizer))
    out_file = tmp_path / "v.html"
    assert main([str(tmp_path / "d"), "--viewer", str(out_file)]) == 2  # the manifest names no model
    assert "pass --tokenizer" in capsys.readouterr().err
    manifest = Manifest.load(tmp_path / "d")
    manifest.config["model"] = str(smol_tokenizer_dir)
    manifest.save(tmp_path / "d")
    assert main([str(tmp_path / "d"), "--viewer", str(out_file), "--id", "ex-00003"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err
    assert "ex-00003" in out_file.read_text(encoding="utf-8") and "scorer agreement" not in captured.out


def test_errors_exit_2_naming_the_path(tmp_path, annotated, capsys):
    missing = tmp_path / "missing"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and MANIFEST_NAME in err
    path, _ = annotated
    (path / shard_name(2)).write_bytes(b"not parquet at all")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path / shard_name(2)) in err
    with pytest.raises(SystemExit) as info:
        main([str(path), "--rho", "1.0"])
    assert info.value.code == 2


def test_module_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "annotate.view", str(tmp_path / "nope")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"error: {tmp_path / 'nope'}: no such directory" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "annotate.view", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=120).stdout
    assert "--viewer OUT.html" in help_text and "example:" in help_text


@pytest.mark.parametrize("params, said", [
    ({"term": "token", "sublinear_tf": True}, "1 + log(tf) (sublinear_tf=True: sftgo's variant, the default before issue 27), smoothed IDF"),
    ({"term": "token", "sublinear_tf": False}, "raw term counts (sublinear_tf=False: the paper's), smoothed IDF"),
    ({"term": "token"}, "term frequency not recorded (its options have no sublinear_tf): raw counts or 1 + log(tf) unknown"),
], ids=["old-default-sublinear", "paper-raw", "key-missing"])
def test_inspect_and_card_say_which_tfidf_variant(tmp_path, capsys, params, said):
    """A directory made with the old default (1 + log tf) still reads, and says so; one without the key says that."""
    from annotate.card import write_card
    from schemas.shard import CARD_NAME, ScorerInfo

    out = tmp_path / "ann"
    manifest = write_annotated_dir(out, make_examples(5, ["tfidf", "base_loss"], seed=2), ["tfidf", "base_loss"])
    manifest.scorers = [ScorerInfo("tfidf", params=params), ScorerInfo("base_loss", model="m")]
    manifest.save(out)
    assert main([str(out)]) == 0
    assert f"  variant           tfidf: {said}\n" in capsys.readouterr().out
    assert summarize(str(out))["variants"] == {"tfidf": said}  # base_loss has no variants
    write_card(out, Manifest.load(out))
    assert f"\ntfidf: {said}.\n" in (out / CARD_NAME).read_text()
