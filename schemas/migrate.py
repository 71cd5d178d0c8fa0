"""Rename a schema-v1 annotated directory's sidecars to their v2 names, in place.

    python -m schemas.migrate DIR [DIR ...]

v1 and v2 shards are the same files; v2 only names the files beside them with a leading ``_``
(``manifest.json`` -> ``_manifest.json``, ``rejects.jsonl`` -> ``_rejects.jsonl``, ...), so that
pyarrow, DuckDB and ``datasets`` read the directory as one table by its path. Every sftgo command
reads v1 directories as they are; migrate when other tools should read them too. Annotate migrates
a v1 directory by itself before it resumes it or adds scorers to it. Safe to rerun, and to kill: the
manifest moves last, and a directory with both manifests is finished by the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from schemas.shard import MANIFEST_NAME, SCHEMA_VERSION, V1_SIDECAR_NAMES, Manifest, program


def is_v1_directory(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds any sidecar under its v1 name."""
    return any((Path(directory) / old).exists() for old in V1_SIDECAR_NAMES.values())


def migrate_directory(directory: str | os.PathLike) -> list[str]:
    """Move v1 sidecars to their v2 names; return what was done, one line per file (empty: nothing to do).

    Raises ValueError when both names of a sidecar exist with different contents, or the v1
    manifest is not a v1 manifest.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    done: list[str] = []
    for new, old in V1_SIDECAR_NAMES.items():
        if new == MANIFEST_NAME or not (root / old).exists():
            continue
        if (root / new).exists():
            if (root / new).read_bytes() != (root / old).read_bytes():
                raise ValueError(f"{root}: both {old} and {new} exist and differ; keep one")
            (root / old).unlink()
        else:
            os.replace(root / old, root / new)
        done.append(f"{old} -> {new}")
    old_manifest = root / V1_SIDECAR_NAMES[MANIFEST_NAME]
    if old_manifest.exists():
        if not (root / MANIFEST_NAME).exists():
            try:
                raw = json.loads(old_manifest.read_text(encoding="utf-8"))
                manifest = Manifest.from_dict(raw)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise ValueError(f"{old_manifest}: not a shard manifest ({exc})") from None
            if manifest.schema_version != 1:
                raise ValueError(f"{old_manifest}: schema_version {manifest.schema_version}; only a v1 manifest has this name")
            manifest.schema_version = SCHEMA_VERSION
            manifest.save(root)  # atomic; the v1 file goes only after the v2 one is complete
        old_manifest.unlink()
        done.append(f"{old_manifest.name} -> {MANIFEST_NAME} (schema_version {SCHEMA_VERSION})")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program("python -m schemas.migrate"), description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", metavar="DIR", help="annotated directory (local)")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.directories:
        try:
            done = migrate_directory(directory)
        except (ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{directory}: " + ("; ".join(done) if done else f"already schema v{SCHEMA_VERSION}, nothing to do"))
    return status


if __name__ == "__main__":
    sys.exit(main())
