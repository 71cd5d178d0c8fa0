"""python -m schemas.validate: a valid directory passes; each kind of damage is named exactly."""

import json

import pyarrow as pa
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
    assert "valid shard schema v1: 3 shards, 20 rows" in capsys.readouterr().out


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
    manifest["schema_version"] = 2
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "schema_version 2" in validate_directory(path).problems[0]


def test_tokenizer_mismatch_and_corrupt_file(tmp_path):
    path = _dir(tmp_path)
    assert any("tokenizer fingerprint" in p for p in validate_directory(path, tokenizer_sha256="other").problems)
    (path / "shard-00000.parquet").write_bytes(b"not parquet")
    assert any("shard-00000.parquet: not a readable Parquet file" in p for p in validate_directory(path, deep=False).problems)
