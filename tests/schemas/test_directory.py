"""schemas.directory.open_directory (local, file://, remote, v1) and the shared predicates of schemas.shard."""

import json

import fsspec
import numpy as np
import pytest

from schemas.directory import DirectoryError, open_directory
from schemas.shard import (
    MANIFEST_NAME,
    REJECTS_NAME,
    V1_SIDECAR_NAMES,
    Manifest,
    first_non_finite,
    has_ref_loss,
    has_score,
    join,
    shard_name,
)
from tests.train.conftest import make_examples, write_annotated_dir


def _dir(tmp_path, scorers=("tfidf",)):
    path = tmp_path / "ann"
    write_annotated_dir(path, make_examples(10, list(scorers)), list(scorers), rows_per_shard=4)
    return path


def test_local_path_and_file_uri_open_alike(tmp_path):
    path = _dir(tmp_path)
    for uri in (str(path), f"file://{path}"):
        d = open_directory(uri)
        assert d.uri == uri and d.manifest_name == MANIFEST_NAME and d.manifest_uri == f"{uri}/{MANIFEST_NAME}"
        assert d.shard_paths == [str(path / shard_name(i)) for i in range(3)]
        assert d.shard_uris == [f"{uri}/{shard_name(i)}" for i in range(3)]
        assert d.sidecar(REJECTS_NAME) == str(path / REJECTS_NAME)
    assert Manifest.load(path) == open_directory(path).manifest


def test_remote_directory_through_fsspec(tmp_path):
    path = _dir(tmp_path)
    fs = fsspec.filesystem("memory")
    root = f"/sftgo-test-directory-{tmp_path.name}"
    for file in path.iterdir():
        fs.pipe(f"{root}/{file.name}", file.read_bytes())
    try:
        d = open_directory(f"memory://{root}")
        assert d.manifest == Manifest.load(path)
        assert d.shard_uris[0] == f"memory://{root}/{shard_name(0)}" and d.fs.exists(d.shard_paths[0])
    finally:
        fs.rm(root, recursive=True)


def test_v1_directory_reads_its_sidecar_names(tmp_path):
    path = _dir(tmp_path)
    raw = json.loads((path / MANIFEST_NAME).read_text())
    raw["schema_version"] = 1
    (path / MANIFEST_NAME).unlink()
    (path / V1_SIDECAR_NAMES[MANIFEST_NAME]).write_text(json.dumps(raw))
    d = open_directory(path)
    assert d.manifest_name == "manifest.json" and d.manifest.schema_version == 1
    assert d.sidecar(REJECTS_NAME) == str(path / "rejects.jsonl")
    raw["schema_version"] = 2
    (path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DirectoryError, match="schema_version 2 under the v1 name"):
        open_directory(path)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DirectoryError, match=f"{tmp_path / 'nope'}: no such directory"):
        open_directory(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DirectoryError, match="file: not a directory"):
        open_directory(tmp_path / "file")
    path = _dir(tmp_path)
    manifest = path / MANIFEST_NAME
    text = manifest.read_text()
    raw = json.loads(text)
    del raw["totals"]
    raw["shards"][1]["rows"] = "x"
    manifest.write_text(json.dumps(raw))
    with pytest.raises(DirectoryError) as info:
        open_directory(path)
    assert info.value.problems == [f"{manifest}: missing field 'totals'", f"{manifest}: shards[1].rows: expected a count, got 'x'"]
    manifest.write_text("{not json")
    with pytest.raises(ValueError, match=f"{manifest}: unreadable manifest"):
        open_directory(path)
    manifest.write_text(text.replace('"schema_version": 2', '"schema_version": 9'))
    with pytest.raises(ValueError, match=f"{manifest}: schema_version 9, this code reads 1 and 2"):
        open_directory(path)
    manifest.unlink()
    with pytest.raises(ValueError, match=f"{manifest}: missing"):
        open_directory(path)


def test_score_predicates(tmp_path):
    manifest = open_directory(_dir(tmp_path, ("tfidf", "base_loss", "ref_loss"))).manifest
    assert has_score(manifest, "tfidf") and has_score(manifest, "excess_loss") and not has_score(manifest, "entropy")
    assert has_ref_loss(manifest)
    manifest.scorers = manifest.scorers[:2]  # tfidf and base_loss
    assert not has_score(manifest, "excess_loss") and not has_ref_loss(manifest)


def test_first_non_finite_and_join():
    offsets = np.array([0, 2, 2, 5])  # rows of 2, 0 and 3 values
    assert first_non_finite(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), offsets) is None
    assert first_non_finite(np.array([0.0, 1.0, 2.0, np.inf, np.nan]), offsets) == 2
    assert first_non_finite(np.array([np.nan, 1.0, 2.0, 3.0, 4.0]), offsets) == 0
    assert join("s3://b/d/", "x") == "s3://b/d/x" and join("/d", "x") == "/d/x"
