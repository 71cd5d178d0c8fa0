"""Every input container through annotate: the same records give the same tokens from JSONL, CSV, TSV, Parquet
and a save_to_disk folder; rejects keep their file and line (CSV) or row (Parquet); the TruthfulQA-shaped CSV
of issue 30 runs end to end through `python annotate/run.py`; exit codes 2 (before Ray) and 3 (no row)."""

import csv
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from annotate import steps
from schemas.shard import INPUT_IDS, Manifest
from tests.conftest import REPO

QA = [{"Question": f"What is {i} plus {i}, in words?", "Best Answer": f"It is {2 * i}.\nThat is all."} for i in range(6)]
MAPPING = {"instruction": "Question", "output": "Best Answer"}


def _tokenize(paths, tokenizer, columns=MAPPING):
    plans = steps.plan_shards([str(p) for p in paths], "auto", shard_size=4, columns=columns)
    out = [steps.tokenize_shard(plan, tokenizer, 256, "truncate", strict=False) for plan in plans]
    return plans, [ids for table, _, _ in out for ids in table[INPUT_IDS].to_pylist()], [r for _, rs, _ in out for r in rs]


def test_every_container_gives_the_same_tokens(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in QA))
    expected = _tokenize([jsonl], smol_tokenizer)[1]
    assert len(expected) == len(QA)
    for name, delimiter in (("qa.csv", ","), ("qa.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(QA[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(QA)
    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "qa.parquet", row_group_size=4)
    datasets.Dataset.from_list(QA).save_to_disk(str(tmp_path / "saved"))
    for path in ("qa.csv", "qa.tsv", "qa.parquet", "saved"):
        plans, ids, rejects = _tokenize([tmp_path / path], smol_tokenizer)
        assert ids == expected and not rejects, path
        assert [p.records for p in plans] == [4, 2]
    # The mapping is part of a shard's key: another mapping of the same file is another job.
    plan = steps.plan_shards([str(tmp_path / "qa.csv")], "auto", shard_size=4, columns=MAPPING)[0]
    assert plan.key({})["columns"] == MAPPING
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    assert "columns" not in steps.plan_shards([str(alpaca)], "auto", 4)[0].key({})  # (keys of older shards still match)


def test_rejects_keep_the_csv_line_and_the_parquet_row(tmp_path, smol_tokenizer):
    rows = [dict(r) for r in QA]
    rows[2]["Best Answer"] = "   "
    with open(tmp_path / "qa.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(QA[0]))
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet", row_group_size=4)
    _, _, rejects = _tokenize([tmp_path / "qa.csv"], smol_tokenizer)
    # Header line 1, each record two lines: record 2 (0-based) starts on line 6 (its answer holds no line break).
    assert [(r.file, r.line, r.reason) for r in rejects] == [(str(tmp_path / "qa.csv"), 6, "empty_response")]
    _, _, rejects = _tokenize([tmp_path / "qa.parquet"], smol_tokenizer)
    assert [(r.file, r.line, r.reason) for r in rejects] == [(str(tmp_path / "qa.parquet"), 2, "empty_response")]


# -- end to end: the TruthfulQA CSV ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def truthfulqa_csv(tmp_path_factory):
    """120 rows shaped like TruthfulQA's CSV (Type, Category, Question, Best Answer, ... , Source)."""
    path = tmp_path_factory.mktemp("tqa") / "TruthfulQA.csv"
    fields = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for i in range(120):
            writer.writerow(["Adversarial", "Misconceptions", f"What happens if you do thing {i}, really?",
                             f"Nothing in particular happens ({i})", "Nothing; nothing at all", "You die", "https://example.org"])
    return path


def _annotate(*args, timeout=600):
    """`python annotate/run.py ARGS` with a Ray of its own (its own temp dir: other Rays on the machine are not joined)."""
    env = {**os.environ, "PYTHONPATH": "", "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "annotate" / "run.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - start


def _validate(directory):
    return subprocess.run([sys.executable, "-m", "schemas.validate", str(directory)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_an_undetectable_layout_exits_2_before_ray_starts(tmp_path, truthfulqa_csv, tiny_llama_dir):
    done, _ = _annotate("--input", truthfulqa_csv, "--model", tiny_llama_dir, "--output", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "== annotate config ==" not in done.stdout and "Ray" not in done.stderr  # nothing started
    assert (f"error: {truthfulqa_csv} (csv): cannot tell the record layout (--format auto) from its columns ['Type', "
            f"'Category', 'Question', 'Best Answer', 'Correct Answers', 'Incorrect Answers', 'Source']") in done.stderr
    assert "--columns instruction=Question,output='Best Answer'" in done.stderr
    done, _ = _annotate("--input", truthfulqa_csv, "--model", tiny_llama_dir, "--output", tmp_path / "out",
                        "--columns", "instruction=Question,output=Best answer")
    assert done.returncode == 2
    assert "--columns output=Best answer: no column 'Best answer' (did you mean 'Best Answer'?)" in done.stderr
    done, _ = _annotate("--input", truthfulqa_csv, "--format", "csv", "--output", tmp_path / "out")
    assert done.returncode == 2 and "format: 'csv' is a file container" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_truthfulqa_csv_end_to_end(tmp_path, truthfulqa_csv, tiny_llama_dir):
    out = tmp_path / "tqa"
    done, _ = _annotate("--input", truthfulqa_csv, "--model", tiny_llama_dir, "--scorers", "tfidf", "--output", out,
                        "--columns", "instruction=Question,output=Best Answer", "--shard-size", "50")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = Manifest.load(out)
    assert manifest.totals["rows"] == 120 and manifest.rejected == {} and len(manifest.shards) == 3
    assert manifest.config["columns"] == MAPPING
    assert _validate(out).returncode == 0


@pytest.mark.slow
def test_a_job_that_writes_no_row_exits_3_and_validate_refuses_it(tmp_path, truthfulqa_csv, tiny_llama_dir):
    out = tmp_path / "none"
    done, _ = _annotate("--input", truthfulqa_csv, "--format", "messages", "--limit", "20", "--model", tiny_llama_dir,
                        "--scorers", "tfidf", "--output", out)
    assert done.returncode == 3, done.stderr[-3000:]
    assert (f"error: {out}: no row written: all 20 records were rejected (missing_field: 20); the first: "
            f"{truthfulqa_csv}:2: missing_field: missing field 'messages' (its columns: ['Type', 'Category', 'Question', "
            f"'Best Answer', 'Correct Answers', 'Incorrect Answers', 'Source']); every reject is in {out}/_rejects.jsonl. "
            f"Check that --format messages and --columns match the input's fields") in done.stderr
    checked = _validate(out)
    assert checked.returncode == 1
    assert (f"{out}/_manifest.json: 0 rows, nothing to train on: all 20 input records were rejected (missing_field: 20; "
            f"see {out}/_rejects.jsonl)") in checked.stderr
