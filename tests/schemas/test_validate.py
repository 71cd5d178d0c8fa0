"""python -m schemas.validate: a valid directory passes; each kind of damage is named exactly."""

import json

import pyarrow as pa
import pytest
import pyarrow.parquet as pq

from schemas.shard import MANIFEST_NAME, score_column
from schemas.validate import main, validate_directory
from tests.train.conftest import make_examples, write_annotated_dir


def _dir(tmp_path, **kw):
    path = tmp_path / "ann"
    write_annotated_dir(path, make_examples(20, ["tfidf"]), ["tfidf"], rows_per_shard=8, **kw)
    return path


def test_valid_directory_passes(tmp_path, capsys):
    path = _dir(tmp_path)
    assert validate_directory(path).ok
    assert main([str(path)]) == 0
    assert "valid shard schema v2: 3 shards, 20 rows" in capsys.readouterr().out


def test_missing_manifest_and_unlisted_shard(tmp_path):
    path = _dir(tmp_path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"] = manifest["shards"][:2]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = validate_directory(path).problems
    assert any("shard-00002.parquet: shard file not listed" in p for p in problems)
    (path / MANIFEST_NAME).unlink()
    assert "missing" in validate_directory(path).problems[0]


def test_changed_shard_nan_and_version(tmp_path, capsys):
    path = _dir(tmp_path)
    shard = path / "shard-00001.parquet"
    table = pq.read_table(shard)
    scores = table[score_column("tfidf")].to_pylist()
    scores[3][0] = float("nan")
    field = table.schema.field(score_column("tfidf"))
    table = table.set_column(table.schema.get_field_index(field.name), field, pa.array(scores, field.type))
    pq.write_table(table, shard)
    problems = validate_directory(path).problems
    assert any("shard-00001.parquet: sha256 differs" in p for p in problems)
    assert any("shard-00001.parquet: row 3: score_tfidf holds NaN" in p for p in problems)
    assert main([str(path)]) == 1
    assert "INVALID" in capsys.readouterr().err
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 3
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "schema_version 3, this code reads 1 and 2" in validate_directory(path).problems[0]


def test_tokenizer_mismatch_and_corrupt_file(tmp_path):
    path = _dir(tmp_path)
    assert any("tokenizer fingerprint" in p for p in validate_directory(path, tokenizer_sha256="other").problems)
    (path / "shard-00000.parquet").write_bytes(b"not parquet")
    assert any("shard-00000.parquet: not a readable Parquet file" in p for p in validate_directory(path, deep=False).problems)


BAD_PATHS = ["../outside/shard-00000.parquet", "/etc/shard-00000.parquet", "s3://bucket/shard-00000.parquet",
             "sub/shard-00000.parquet", "shard-00000.parquet.bak", "evil.parquet", 7]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[str(p) for p in BAD_PATHS])
def test_manifest_shard_paths_stay_inside_the_directory(tmp_path, bad, capsys):
    """A manifest from someone else cannot make validate, train, inspect or --add-scorers read outside it."""
    from annotate.pipeline import _existing_annotation
    from data.shard_stats import summarize
    from train.shards import open_annotated

    path = _dir(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shard-00000.parquet").write_bytes((path / "shard-00000.parquet").read_bytes())
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"][0]["path"] = bad
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = validate_directory(path).problems
    expected = f"manifest shards[0].path {bad!r}: not a shard file name" if isinstance(bad, str) else "shards[0].path: expected str, got 7"
    assert len(problems) == 1 and expected in problems[0]
    assert main([str(path)]) == 1
    assert "shards[0].path" in capsys.readouterr().err
    for reader in (lambda: open_annotated(str(path), None, "tfidf"), lambda: summarize(str(path)),
                   lambda: _existing_annotation(path)):
        with pytest.raises(ValueError, match=r"shards\[0\]\.path"):
            reader()


def test_manifest_duplicate_shard_is_refused(tmp_path):
    path = _dir(tmp_path)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"][2]["path"] = manifest["shards"][0]["path"]
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = validate_directory(path).problems
    assert problems == [f"{path / MANIFEST_NAME}: manifest shards[2].path 'shard-00000.parquet': listed twice (also shards[0])"]


def test_a_directory_of_zero_rows_is_refused_saying_why(tmp_path, capsys):
    path = tmp_path / "empty"
    write_annotated_dir(path, [], ["tfidf"])  # one shard of 0 rows: well formed, nothing to train on
    assert validate_directory(path).ok  # the contract holds (the trainer says "empty dataset" itself)
    assert main([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}/{MANIFEST_NAME}: 0 rows, nothing to train on: no input record reached it" in err
    assert f"{path}: INVALID (1 problems)" in err
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["rejected"] = {"malformed_json": 18, "missing_field": 2}
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main([str(path), "--quick"]) == 1
    assert (f"0 rows, nothing to train on: all 20 input records were rejected (malformed_json: 18, missing_field: 2; "
            f"see {path}/_rejects.jsonl)") in capsys.readouterr().err
