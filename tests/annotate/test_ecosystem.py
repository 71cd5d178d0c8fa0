"""An annotated directory is one table to pyarrow, DuckDB, polars and datasets, and carries a dataset
card in the Hugging Face format, kept current by --add-scorers (which also migrates a v1 directory)."""

import json

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from annotate.run import main
from schemas.shard import CARD_NAME, ID, MANIFEST_NAME, Manifest, arrow_schema
from schemas.validate import validate_directory

pytestmark = pytest.mark.slow


def _sorted(rows):
    return sorted(rows, key=lambda r: r[ID])


def _read_everywhere(directory):
    """The directory through each tool, by its path alone (polars: its one documented argument)."""
    import datasets
    import duckdb
    import polars as pl

    path = str(directory)
    return {
        "pyarrow.parquet": pq.read_table(path),
        "pyarrow.dataset": pads.dataset(path).to_table(),
        "duckdb": duckdb.sql(f"select * from read_parquet('{path}')").fetch_arrow_table(),
        "polars": pl.scan_parquet(path, hidden_file_prefix="_").collect().to_arrow(),
        "polars glob": pl.read_parquet(f"{path}/*.parquet").to_arrow(),
        "datasets": datasets.load_dataset(path, split="train").data.table,
    }


def _card(directory):
    from huggingface_hub import DatasetCard

    return DatasetCard.load(directory / CARD_NAME)


def test_every_tool_reads_the_directory_and_the_card_describes_it(tmp_path, lima_slice, tiny_llama_dir):
    import datasets

    out = tmp_path / "lima"
    assert main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                 "--output", str(out), "--shard-size", "12", "--license", "cc-by-nc-sa-4.0"]) == 0
    manifest = Manifest.load(out)
    expected = _sorted([row for shard in manifest.shards for row in pq.read_table(out / shard.path).to_pylist()])
    schema = arrow_schema(manifest.scorer_names)
    for tool, table in _read_everywhere(out).items():
        assert table.num_rows == manifest.totals["rows"], tool
        assert table.column_names == schema.names, tool
        assert _sorted(table.select(schema.names).to_pylist()) == expected, tool

    card = _card(out)
    front = card.data.to_dict()
    assert front["license"] == "cc-by-nc-sa-4.0"
    assert front["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "shard-*.parquet"}]}]
    assert datasets.Features._from_yaml_list(front["dataset_info"]["features"]) == datasets.Features.from_arrow_schema(schema)
    assert front["dataset_info"]["splits"] == [{"name": "train", "num_examples": manifest.totals["rows"]}]
    assert f"| `{lima_slice}` | lima | cc-by-nc-sa-4.0 |" in card.text
    assert manifest.tokenizer["sha256"] in card.text
    assert f"{manifest.totals['rows']:,} rows, {manifest.totals['tokens']:,} tokens" in card.text
    assert "| tfidf | `score_tfidf` | - | " in card.text and "sublinear_tf=False" in card.text
    assert "tfidf: raw term counts (sublinear_tf=False: the paper's), smoothed IDF." in card.text


def test_add_scorers_migrates_a_v1_directory_and_updates_its_card(tmp_path, lima_slice, tiny_llama_dir, capsys):
    out = tmp_path / "lima"
    assert main(["--input", str(lima_slice), "--format", "lima", "--model", str(tiny_llama_dir), "--scorers", "tfidf",
                 "--output", str(out), "--shard-size", "12"]) == 0
    # Make it a directory as schema v1 wrote it.
    raw = json.loads((out / MANIFEST_NAME).read_text())
    raw["schema_version"] = 1
    (out / "manifest.json").write_text(json.dumps(raw))
    (out / MANIFEST_NAME).unlink()
    (out / "_rejects.jsonl").rename(out / "rejects.jsonl")
    (out / "_annotate_summary.json").rename(out / "annotate_summary.json")
    (out / CARD_NAME).unlink()
    capsys.readouterr()

    assert main(["--output", str(out), "--model", str(tiny_llama_dir), "--add-scorers", "base_loss,entropy",
                 "--scorer-option", "base_loss.max_batch_tokens=256", "--scorer-option", "entropy.max_batch_tokens=256"]) == 0
    assert "schema v1 -> v2: manifest.json -> _manifest.json" in capsys.readouterr().out
    assert not any((out / name).exists() for name in ("manifest.json", "rejects.jsonl", "annotate_summary.json"))
    assert validate_directory(out).ok and Manifest.load(out).schema_version == 2
    card = _card(out)
    assert "score-base_loss" in card.data.to_dict()["tags"]
    assert f"| base_loss | `score_base_loss` | {tiny_llama_dir} |" in card.text
    assert "license (as given)" in card.text and "| not given |" in card.text
    assert pq.read_table(out).column_names[-3:] == ["score_tfidf", "score_base_loss", "score_entropy"]
    summary = json.loads((out / "_annotate_summary.json").read_text())
    assert "base_loss+entropy" in summary["stages"]  # one actor, one model pass for both columns
    # entropy is a score like any other: the trainer and the viewer take it.
    from data.shard_stats import summarize
    from train.shards import open_annotated

    assert "entropy" in open_annotated(str(out), None, "entropy").scorer_names
    assert "entropy" in summarize(str(out))["scorers"]
