"""Check an annotated directory against the shard contract (v2, or v1) and say exactly what is wrong.

    python -m schemas.validate DIR [--quick] [--tokenizer-sha256 HASH]

Exit status 0 when the directory is valid, 1 when it is not (each problem on its own line).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.shard import (
    ID,
    INPUT_IDS,
    LOSS_MASK,
    MANIFEST_NAME,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    SHARD_GLOB,
    Manifest,
    ShardMetadata,
    arrow_schema,
    score_column,
    sidecar_path,
)


class ShardValidationError(ValueError):
    """Raised by :func:`check_directory` with every problem found."""

    def __init__(self, directory: str, problems: list[str]):
        self.directory = directory
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{directory} is not a valid annotated directory (shard schema v{SCHEMA_VERSION}):\n{lines}{more}")


@dataclass
class Report:
    directory: str
    problems: list[str] = field(default_factory=list)
    manifest: Manifest | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def _join(base: str, name: str) -> str:
    return f"{str(base).rstrip('/')}/{name}"


def validate_directory(directory: str | Path, deep: bool = True, tokenizer_sha256: str | None = None) -> Report:
    """Validate an annotated directory: a local path or any fsspec URI (``file://``, ``s3://``, ``gs://``).

    Always checks the manifest, every shard's schema, metadata and footer row count. With
    ``deep`` it also reads the data, one shard at a time: checksums, list lengths, finite scores,
    token counts, unique ids. Messages name files as the caller named the directory.
    """
    import fsspec

    shown_root = str(directory)
    report = Report(shown_root)
    problems = report.problems
    fs, root = fsspec.core.url_to_fs(shown_root)
    manifest_path = sidecar_path(root, MANIFEST_NAME, fs.exists)
    manifest_name = manifest_path.rsplit("/", 1)[-1]
    manifest_shown = _join(shown_root, manifest_name)
    if not fs.isdir(root):
        problems.append(f"{shown_root}: no such directory")
        return report
    if not fs.exists(manifest_path):
        problems.append(f"{manifest_shown}: missing (an annotate job that has not finished leaves no manifest)")
        return report
    try:
        with fs.open(manifest_path, "r", encoding="utf-8") as f:
            raw = json.load(f)
        typing_problems = manifest_type_problems(raw)
        if typing_problems:
            problems.extend(f"{manifest_shown}: {p}" for p in typing_problems)
            return report
        manifest = Manifest.from_dict(raw)
    except ValueError as exc:  # a shard path that leaves the directory (before JSONDecodeError, its subclass)
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            problems.append(f"{manifest_shown}: not a shard manifest ({type(exc).__name__}: {exc})")
        else:
            problems.append(f"{manifest_shown}: {exc}")
        return report
    except (TypeError, KeyError, AttributeError) as exc:
        problems.append(f"{manifest_shown}: not a shard manifest ({type(exc).__name__}: {exc})")
        return report
    report.manifest = manifest
    if manifest.schema_version not in READABLE_SCHEMA_VERSIONS:
        problems.append(f"{manifest_shown}: schema_version {manifest.schema_version}, this code reads "
                        f"{' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
        return report
    if manifest_name != MANIFEST_NAME and manifest.schema_version != 1:
        problems.append(f"{manifest_shown}: schema_version {manifest.schema_version} under the v1 name; v2 names it {MANIFEST_NAME}")
        return report
    if tokenizer_sha256 is not None and manifest.tokenizer.get("sha256") != tokenizer_sha256:
        problems.append(
            f"{manifest_shown}: tokenizer fingerprint {manifest.tokenizer.get('name')}:{manifest.tokenizer.get('sha256', '')[:12]} "
            f"differs from the model's tokenizer ({tokenizer_sha256[:12]}); re-annotate with this model's tokenizer"
        )
    if not manifest.shards:
        problems.append(f"{manifest_shown}: lists no shards")

    scorers = manifest.scorer_names
    expected_schema = arrow_schema(scorers)
    listed = {entry.path for entry in manifest.shards}
    for found in sorted(fs.glob(_join(root, SHARD_GLOB))):
        name = str(found).rsplit("/", 1)[-1]
        if name not in listed:
            problems.append(f"{_join(shown_root, name)}: shard file not listed in {manifest_name}")

    seen_ids: dict[str, str] = {}
    totals = {"rows": 0, "tokens": 0, "trainable_tokens": 0}
    for entry in manifest.shards:
        path, shown = _join(root, entry.path), _join(shown_root, entry.path)
        if not fs.exists(path):
            problems.append(f"{shown}: listed in {manifest_name} but missing")
            continue
        try:
            with fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f)
                schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
                table = parquet.read() if deep else None
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(f"{shown}: not a readable Parquet file ({exc})")
            continue
        if not schema.remove_metadata().equals(expected_schema):
            problems.append(f"{shown}: columns {schema.names} / types differ from shard schema v{SCHEMA_VERSION} with scorers {scorers}")
            continue
        try:
            meta = ShardMetadata.from_schema(schema)
        except (KeyError, ValueError, TypeError) as exc:  # (json.JSONDecodeError is a ValueError)
            problems.append(f"{shown}: bad file metadata ({type(exc).__name__}: {exc})")
            continue
        if meta.schema_version not in READABLE_SCHEMA_VERSIONS:
            problems.append(f"{shown}: schema_version {meta.schema_version}, expected one of {list(READABLE_SCHEMA_VERSIONS)}")
        if meta.tokenizer != manifest.tokenizer:
            problems.append(f"{shown}: tokenizer fingerprint {meta.tokenizer} differs from the manifest's {manifest.tokenizer}")
        if [s.name for s in meta.scorers] != scorers:
            problems.append(f"{shown}: scorers {[s.name for s in meta.scorers]} differ from the manifest's {scorers}")
        if num_rows != entry.rows:
            problems.append(f"{shown}: {num_rows} rows, manifest says {entry.rows}")
        if table is None:
            continue
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != entry.sha256:
            problems.append(f"{shown}: sha256 differs from the manifest (file changed after annotation)")
        problems.extend(_check_rows(shown, table, scorers, entry, seen_ids, totals))

    if deep:
        for key, value in totals.items():
            if manifest.totals.get(key) != value:
                problems.append(f"{manifest_shown}: totals.{key} = {manifest.totals.get(key)}, shards hold {value}")
    return report


_MANIFEST_FIELDS = {"schema_version": int, "tokenizer": dict, "scorers": list, "shards": list, "totals": dict,
                    "rejected": dict, "score_stats": dict, "config": dict, "created_by": str}
_OPTIONAL_FIELDS = {"config", "created_by"}
_SHARD_FIELDS = {"path": str, "rows": int, "tokens": int, "trainable_tokens": int, "sha256": str}


def _type_ok(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def manifest_type_problems(raw: Any) -> list[str]:
    """Missing or mistyped manifest fields, each named (``shards[2].rows: expected int, got 'x'``); [] if none."""
    if not isinstance(raw, dict):
        return [f"expected a JSON object, got {type(raw).__name__}"]
    out = []
    for key, kind in _MANIFEST_FIELDS.items():
        if key not in raw:
            if key not in _OPTIONAL_FIELDS:
                out.append(f"missing field {key!r}")
        elif not _type_ok(raw[key], kind):
            out.append(f"{key}: expected {kind.__name__}, got {raw[key]!r:.60}")
    out += [f"unknown field {key!r}" for key in sorted(set(raw) - set(_MANIFEST_FIELDS))]
    for i, entry in enumerate(raw.get("shards") if isinstance(raw.get("shards"), list) else []):
        if not isinstance(entry, dict):
            out.append(f"shards[{i}]: expected an object, got {entry!r:.60}")
            continue
        for key, kind in _SHARD_FIELDS.items():
            if key not in entry:
                out.append(f"shards[{i}]: missing field {key!r}")
            elif not _type_ok(entry[key], kind) or (kind is int and entry[key] < 0):
                out.append(f"shards[{i}].{key}: expected {'a count' if kind is int else kind.__name__}, got {entry[key]!r:.60}")
        out += [f"shards[{i}]: unknown field {key!r}" for key in sorted(set(entry) - set(_SHARD_FIELDS))]
    for i, scorer in enumerate(raw.get("scorers") if isinstance(raw.get("scorers"), list) else []):
        if not isinstance(scorer, dict) or not isinstance(scorer.get("name"), str):
            out.append(f"scorers[{i}]: expected an object with a string 'name', got {scorer!r:.60}")
    for section in ("tokenizer", "totals", "rejected"):
        value = raw.get(section)
        if isinstance(value, dict):
            kind = str if section == "tokenizer" else int
            out += [f"{section}.{k}: expected {kind.__name__}, got {v!r:.60}" for k, v in value.items() if not _type_ok(v, kind)]
    return out


def _check_rows(path: str, table: pa.Table, scorers: list[str], entry, seen_ids: dict[str, str], totals: dict[str, int]) -> list[str]:
    problems: list[str] = []
    lengths = pc.list_value_length(table[INPUT_IDS]).to_numpy(zero_copy_only=False)
    for column in (LOSS_MASK, *[score_column(s) for s in scorers]):
        other = pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(other != lengths)
        if bad.size:
            problems.append(f"{path}: row {bad[0]}: {column} has {other[bad[0]]} values for {lengths[bad[0]]} input_ids ({bad.size} rows)")
    for scorer in scorers:
        values = pc.list_flatten(table[score_column(scorer)]).to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all():
            offsets = np.cumsum(lengths)
            first = int(np.searchsorted(offsets, np.flatnonzero(~np.isfinite(values))[0], side="right"))
            problems.append(f"{path}: row {first}: {score_column(scorer)} holds NaN or infinite values")
    for row, example_id in enumerate(table[ID].to_pylist()):
        if example_id in seen_ids:
            problems.append(f"{path}: row {row}: id {example_id} also in {seen_ids[example_id]}")
        seen_ids[example_id] = f"{path.rsplit('/', 1)[-1]} row {row}"
    tokens = int(lengths.sum())
    trainable = int(pc.sum(pc.list_flatten(table[LOSS_MASK]).cast(pa.int64())).as_py() or 0)
    if tokens != entry.tokens:
        problems.append(f"{path}: {tokens} tokens, manifest says {entry.tokens}")
    if trainable != entry.trainable_tokens:
        problems.append(f"{path}: {trainable} trainable tokens, manifest says {entry.trainable_tokens}")
    totals["rows"] += table.num_rows
    totals["tokens"] += tokens
    totals["trainable_tokens"] += trainable
    return problems


def check_directory(directory: str | Path, deep: bool = True, tokenizer_sha256: str | None = None) -> Manifest:
    """Validate and return the manifest; raise :class:`ShardValidationError` listing every problem."""
    report = validate_directory(directory, deep=deep, tokenizer_sha256=tokenizer_sha256)
    if not report.ok:
        raise ShardValidationError(str(directory), report.problems)
    assert report.manifest is not None
    return report.manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m schemas.validate", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m schemas.validate shards/lima --quick")
    parser.add_argument("directory", help=f"annotated directory or fsspec URI (holds {MANIFEST_NAME} and shard-*.parquet)")
    parser.add_argument("--quick", action="store_true", help="check manifest, schemas and footers only; skip reading the data")
    parser.add_argument("--tokenizer-sha256", default=None, help="also require this tokenizer fingerprint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = validate_directory(args.directory, deep=not args.quick, tokenizer_sha256=args.tokenizer_sha256)
    if report.ok:
        m = report.manifest
        assert m is not None
        print(f"{args.directory}: valid shard schema v{m.schema_version}: {len(m.shards)} shards, "
              f"{m.totals.get('rows')} rows, {m.totals.get('tokens')} tokens, scorers {m.scorer_names}")
        return 0
    for problem in report.problems:
        print(problem, file=sys.stderr)
    print(f"{args.directory}: INVALID ({len(report.problems)} problems)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
