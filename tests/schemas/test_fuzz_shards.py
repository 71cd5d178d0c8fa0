"""Fuzzing annotated directories: hundreds of seeded mutations (byte flips, truncation, wrong column
types and lengths, broken footer metadata, manifest fields removed or mistyped, sha256 mismatches).
schemas.validate names each problem with its file (and row) and exits 1, never a traceback; the
trainer refuses such a directory before step 1."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.shard import INPUT_IDS, LOSS_MASK, MANIFEST_NAME, METADATA_KEY, file_sha256, score_column, tokenizer_fingerprint
from schemas.validate import main as validate_main
from schemas.validate import validate_directory
from tests.conftest import REPO
from tests.train.conftest import make_examples, write_annotated_dir

MUTATIONS = 240
SCORE = score_column("tfidf")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("pristine") / "ann"
    fp = tokenizer_fingerprint(smol_tokenizer)
    write_annotated_dir(root, make_examples(24, ["tfidf"], min_len=8, max_len=30), ["tfidf"], tokenizer_fp=fp, rows_per_shard=8)
    assert validate_directory(root).ok
    return root


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.parquet"))


def _rewrite(shard: Path, table: pa.Table, folder: Path, fix_sha: bool = True) -> None:
    """Write ``table`` over ``shard``; with ``fix_sha`` the manifest's checksum follows, so only the
    content problem remains to be found."""
    pq.write_table(table, shard)
    if fix_sha:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        for entry in manifest["shards"]:
            if entry["path"] == shard.name:
                entry["sha256"] = file_sha256(shard)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def mutate(folder: Path, rng: random.Random) -> str:
    """Damage ``folder`` one way, chosen by ``rng``; returns what was done."""
    shard = rng.choice(_shards(folder))
    kind = rng.choice(["flip", "truncate", "manifest_drop", "manifest_type", "sha256", "column_type", "list_length",
                       "metadata", "nan", "drop_column"])
    if kind == "flip":
        data = bytearray(shard.read_bytes())
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        return f"flip byte {at} of {shard.name}"
    if kind == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[:rng.randrange(len(data))])
        return f"truncate {shard.name}"
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    if kind in ("manifest_drop", "manifest_type"):
        target = manifest if rng.random() < 0.5 else rng.choice(manifest["shards"])
        # config, created_by and system_prompt have defaults: dropping them leaves a valid manifest.
        key = rng.choice(sorted(set(target) - ({"config", "created_by", "system_prompt"} if kind == "manifest_drop" else set())))
        if kind == "manifest_drop":
            del target[key]
        else:  # a value of another JSON type than the field's
            target[key] = rng.choice([v for v in ("x", 7, None, [], {}, 1.5, True) if type(v) is not type(target[key])])
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
        return f"{kind} {key}"
    if kind == "sha256":
        entry = rng.choice(manifest["shards"])
        entry["sha256"] = "0" * 64
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
        return f"sha256 of {entry['path']}"
    table = pq.read_table(shard)
    row = rng.randrange(table.num_rows)
    if kind == "column_type":
        name = rng.choice([INPUT_IDS, LOSS_MASK, SCORE])
        values = [[str(v) for v in x] for x in table[name].to_pylist()]
        index = table.schema.get_field_index(name)
        table = table.set_column(index, pa.field(name, pa.list_(pa.string())), pa.array(values, pa.list_(pa.string())))
        table = table.replace_schema_metadata(pq.read_schema(shard).metadata)
    elif kind in ("list_length", "nan"):
        name = SCORE if kind == "nan" or rng.random() < 0.5 else LOSS_MASK
        values = table[name].to_pylist()
        if kind == "nan":
            values[row][rng.randrange(len(values[row]))] = float("nan")
        else:
            values[row] = values[row][:-1]
        field = table.schema.field(name)
        table = table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))
    elif kind == "metadata":
        meta = dict(pq.read_schema(shard).metadata)
        meta[METADATA_KEY] = rng.choice([b"{not json", b"[]", b'{"schema_version": "one"}', json.dumps({"schema_version": 1}).encode()])
        table = table.replace_schema_metadata(meta)
    else:  # drop_column
        table = table.drop([rng.choice([INPUT_IDS, LOSS_MASK, SCORE, "id"])]).replace_schema_metadata(pq.read_schema(shard).metadata)
    _rewrite(shard, table, folder, fix_sha=rng.random() < 0.8)
    return f"{kind} in {shard.name} row {row}"


def test_validate_names_every_mutation_and_never_crashes(pristine, tmp_path, capsys):
    rng = random.Random(16)
    kinds = {}
    for i in range(MUTATIONS):
        folder = tmp_path / f"m{i}"
        shutil.copytree(pristine, folder)
        what = mutate(folder, rng)
        kinds[what.split()[0]] = kinds.get(what.split()[0], 0) + 1
        report = validate_directory(folder)  # an exception here fails the test: it must never escape
        assert report.problems, f"mutation {i} ({what}) went unnoticed"
        names = {MANIFEST_NAME, *(p.name for p in _shards(pristine))}
        for problem in report.problems:
            assert any(name in problem for name in names), f"mutation {i} ({what}): {problem!r} names no file"
        assert validate_main([str(folder)]) == 1, what
        shutil.rmtree(folder)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(kinds) == 10 and sum(kinds.values()) == MUTATIONS, kinds


@pytest.mark.slow
def test_train_refuses_mutated_directories_before_step_1(pristine, tmp_path, tiny_llama_dir):
    rng = random.Random(7)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    seen = set()
    for i in range(60):
        folder = tmp_path / f"m{i}"
        shutil.copytree(pristine, folder)
        what = mutate(folder, rng)
        kind = what.split()[0]
        if kind in seen:  # one trainer run per kind of damage (each run starts a process)
            shutil.rmtree(folder)
            continue
        seen.add(kind)
        run = tmp_path / f"run{i}"
        proc = subprocess.run([sys.executable, "train/main.py", f"model={tiny_llama_dir}", f"data.train={folder}",
                               f"output_dir={run}", "train.max_steps=1", "data.micro_batch_tokens=64"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 2, f"{what}: exit {proc.returncode}\n{log[-2000:]}"
        assert "Traceback" not in log and "error:" in log, what
        assert not (run / "metrics.jsonl").exists(), what
    assert len(seen) == 10
