"""Check an annotated directory against the shard contract (v2, or v1) and say exactly what is wrong.

    python -m schemas.validate DIR [--quick] [--tokenizer-sha256 HASH]

Exit status 0 when the directory is valid, 1 when it is not (each problem on its own line). A well-formed
directory of 0 rows (every input record rejected) exits 1 too, saying so: nothing to train on.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.directory import DirectoryError, open_directory
from schemas.shard import (
    ID,
    INPUT_IDS,
    LOSS_MASK,
    MANIFEST_NAME,
    REJECTS_NAME,
    READABLE_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    SHARD_GLOB,
    Manifest,
    ShardMetadata,
    arrow_schema,
    first_non_finite,
    join,
    program,
    same_fingerprint,
    score_column,
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


def validate_directory(directory: str | Path, deep: bool = True, tokenizer_sha256: str | None = None) -> Report:
    """Validate an annotated directory: a local path or any fsspec URI (``file://``, ``s3://``, ``gs://``).

    Always checks the manifest, every shard's schema, metadata and footer row count. With
    ``deep`` it also reads the data, one shard at a time: checksums, list lengths, finite scores,
    token counts, unique ids. Messages name files as the caller named the directory.
    """
    shown_root = str(directory)
    report = Report(shown_root)
    problems = report.problems
    try:
        opened = open_directory(shown_root)
    except DirectoryError as exc:
        problems.extend(exc.problems)
        return report
    fs, root, manifest = opened.fs, opened.root, opened.manifest
    manifest_name, manifest_shown = opened.manifest_name, opened.manifest_uri
    report.manifest = manifest
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
    for found in sorted(fs.glob(join(root, SHARD_GLOB))):
        name = str(found).rsplit("/", 1)[-1]
        if name not in listed:
            problems.append(f"{join(shown_root, name)}: shard file not listed in {manifest_name}")

    seen_ids: dict[str, str] = {}
    totals = {"rows": 0, "tokens": 0, "trainable_tokens": 0}
    for entry, path, shown in zip(manifest.shards, opened.shard_paths, opened.shard_uris):
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
        if not same_fingerprint(meta.tokenizer, manifest.tokenizer):
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


def _check_rows(path: str, table: pa.Table, scorers: list[str], entry, seen_ids: dict[str, str], totals: dict[str, int]) -> list[str]:
    problems: list[str] = []
    lengths = pc.list_value_length(table[INPUT_IDS]).to_numpy(zero_copy_only=False)
    for column in (LOSS_MASK, *[score_column(s) for s in scorers]):
        other = pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(other != lengths)
        if bad.size:
            problems.append(f"{path}: row {bad[0]}: {column} has {other[bad[0]]} values for {lengths[bad[0]]} input_ids ({bad.size} rows)")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for scorer in scorers:
        values = pc.list_flatten(table[score_column(scorer)]).to_numpy(zero_copy_only=False)
        first = first_non_finite(values, offsets)
        if first is not None:
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


def empty_problem(directory: str, manifest: Manifest) -> str:
    """Why a directory of 0 rows is refused: every input record was rejected (counts by reason), or none came."""
    rejected = sum(manifest.rejected.values())
    why = (f"all {rejected} input records were rejected ({', '.join(f'{k}: {v}' for k, v in manifest.rejected.items())}; "
           f"see {join(directory, REJECTS_NAME)})" if rejected else "no input record reached it")
    return f"{join(directory, MANIFEST_NAME)}: 0 rows, nothing to train on: {why}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program("python -m schemas.validate"), description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m schemas.validate shards/lima --quick")
    parser.add_argument("directory", help=f"annotated directory or fsspec URI (holds {MANIFEST_NAME} and shard-*.parquet)")
    parser.add_argument("--quick", action="store_true", help="check manifest, schemas and footers only; skip reading the data")
    parser.add_argument("--tokenizer-sha256", default=None, help="also require this tokenizer fingerprint")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = validate_directory(args.directory, deep=not args.quick, tokenizer_sha256=args.tokenizer_sha256)
    if report.ok and not report.manifest.totals.get("rows"):
        # Well formed, yet nothing to train on: the trainer refuses it too ("empty dataset").
        report.problems.append(empty_problem(args.directory, report.manifest))
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
