"""Schema v1 directories (sidecars without the leading underscore) still validate, train and inspect;
python -m schemas.migrate renames them in place, after which pyarrow reads the directory by its path."""

import json

import pyarrow.parquet as pq
import pytest

from data.shard_stats import summarize
from schemas.migrate import main, migrate_directory
from schemas.shard import MANIFEST_NAME, REJECTS_NAME, Manifest, file_sha256
from schemas.validate import validate_directory
from tests.train.conftest import make_examples, write_annotated_dir
from train.shards import ShardStream, open_annotated


@pytest.fixture
def v1_dir(tmp_path):
    path = tmp_path / "v1"
    write_annotated_dir(path, make_examples(20, ["tfidf"]), ["tfidf"], rows_per_shard=8, schema_version=1)
    reject = {"file": "in.jsonl", "line": 7, "reason": "malformed_json", "detail": "x"}
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["rejected"] = {"malformed_json": 1}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "rejects.jsonl").write_text(json.dumps(reject) + "\n")
    return path


def test_a_v1_directory_is_read_as_it_is(v1_dir):
    assert not (v1_dir / MANIFEST_NAME).exists()
    report = validate_directory(v1_dir)
    assert report.ok, report.problems
    assert report.manifest.schema_version == 1
    manifest = open_annotated(str(v1_dir), None, "tfidf")
    assert sum(1 for _ in ShardStream(str(v1_dir), manifest, "tfidf", shuffle=False, epochs=1)) == 20
    summary = summarize(str(v1_dir))
    assert summary["manifest_totals"]["rows"] == 20
    assert [r["line"] for r in summary["rejects"]["examples"]] == [7]  # found under its v1 name
    with pytest.raises(Exception, match="manifest.json"):
        pq.read_table(v1_dir)  # the reason for v2: pyarrow tries manifest.json as a Parquet file


def test_migrate_renames_keeps_the_shards_and_is_idempotent(v1_dir, capsys):
    shards = {p.name: file_sha256(p) for p in v1_dir.glob("shard-*.parquet")}
    assert main([str(v1_dir)]) == 0
    assert "manifest.json -> _manifest.json (schema_version 2)" in capsys.readouterr().out
    assert sorted(p.name for p in v1_dir.iterdir() if not p.name.startswith("shard-")) == [MANIFEST_NAME, REJECTS_NAME]
    assert {p.name: file_sha256(p) for p in v1_dir.glob("shard-*.parquet")} == shards
    assert Manifest.load(v1_dir).schema_version == 2
    assert validate_directory(v1_dir).ok
    assert pq.read_table(v1_dir).num_rows == 20
    assert main([str(v1_dir)]) == 0
    assert "already schema v2, nothing to do" in capsys.readouterr().out


def test_a_migration_killed_between_the_two_manifests_is_finished_by_the_rerun(v1_dir):
    manifest = Manifest.load(v1_dir)
    manifest.schema_version = 2
    manifest.save(v1_dir)  # as if killed right after writing the v2 manifest
    assert migrate_directory(v1_dir)[-1].startswith("manifest.json -> _manifest.json")
    assert not (v1_dir / "manifest.json").exists() and validate_directory(v1_dir).ok


def test_a_v1_name_holding_a_v2_manifest_is_refused(v1_dir):
    raw = json.loads((v1_dir / "manifest.json").read_text())
    raw["schema_version"] = 2
    (v1_dir / "manifest.json").write_text(json.dumps(raw))
    assert "schema_version 2 under the v1 name" in validate_directory(v1_dir).problems[0]
    with pytest.raises(ValueError, match="only a v1 manifest has this name"):
        migrate_directory(v1_dir)
