"""Open an annotated directory, a local path or any fsspec URI: the one reader of its manifest.

    d = open_directory("s3://bucket/shards/demo")   # DirectoryError (a ValueError) naming the file
    d.manifest, d.shard_paths, d.sidecar(REJECTS_NAME)

schemas.validate, data.shard_stats and train.shards (through validate) open directories here, so
they accept and refuse the same ones with the same messages. Messages name files as the caller
named the directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import fsspec

from schemas.shard import (
    MANIFEST_NAME,
    READABLE_SCHEMA_VERSIONS,
    Manifest,
    join,
    sidecar_name,
    sidecar_path,
)


class DirectoryError(ValueError):
    """An annotated directory that cannot be opened; ``problems`` lists each one, naming its file."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class AnnotatedDir:
    """An opened annotated directory: its filesystem, its manifest and where its files are."""

    uri: str  # as the caller named it (what messages show)
    fs: fsspec.AbstractFileSystem
    root: str  # the directory in ``fs``'s terms
    manifest: Manifest
    manifest_name: str  # the manifest's file name as found: v2's, or v1's in a v1 directory

    @property
    def manifest_uri(self) -> str:
        return join(self.uri, self.manifest_name)

    @property
    def shard_paths(self) -> list[str]:
        """The manifest's shards as paths of :attr:`fs`, in manifest order."""
        return [join(self.root, entry.path) for entry in self.manifest.shards]

    @property
    def shard_uris(self) -> list[str]:
        """The manifest's shards named as the caller named the directory (for messages, or readers with their own filesystems)."""
        return [join(self.uri, entry.path) for entry in self.manifest.shards]

    def sidecar(self, name: str) -> str:
        """Path (of :attr:`fs`) of sidecar ``name`` (``REJECTS_NAME`` ...) under this directory's schema version."""
        return join(self.root, sidecar_name(name, self.manifest.schema_version))


def open_directory(uri: str | os.PathLike) -> AnnotatedDir:
    """Open an annotated directory and read its manifest (v2's ``_manifest.json`` or v1's name).

    Reads nothing but the manifest. Raises :class:`DirectoryError` when there is no such directory,
    it is not a directory, the manifest is missing (annotate has not finished) or unreadable, a field
    is missing or mistyped (each named), a shard path leaves the directory, the schema version is
    not one this code reads, or a v2 manifest carries the v1 name.
    """
    shown = str(uri)
    fs, root = fsspec.core.url_to_fs(shown)
    if not fs.isdir(root):
        if fs.exists(root):
            raise DirectoryError([f"{shown}: not a directory (expected an annotated directory holding {MANIFEST_NAME})"])
        raise DirectoryError([f"{shown}: no such directory"])
    path = sidecar_path(root, MANIFEST_NAME, fs.exists)
    name = path.rsplit("/", 1)[-1]
    where = join(shown, name)
    if not fs.exists(path):
        raise DirectoryError([f"{where}: missing (an annotate job that has not finished leaves no {MANIFEST_NAME}; "
                              "or this is not an annotated directory)"])
    try:
        with fs.open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DirectoryError([f"{where}: unreadable manifest ({type(exc).__name__}: {exc})"]) from None
    typing_problems = manifest_type_problems(raw)
    if typing_problems:
        raise DirectoryError([f"{where}: {p}" for p in typing_problems])
    try:
        manifest = Manifest.from_dict(raw)
    except ValueError as exc:  # a shard path that leaves the directory (the message names the entry)
        raise DirectoryError([f"{where}: {exc}"]) from None
    except (TypeError, KeyError, AttributeError) as exc:
        raise DirectoryError([f"{where}: not a shard manifest ({type(exc).__name__}: {exc})"]) from None
    if manifest.schema_version not in READABLE_SCHEMA_VERSIONS:
        raise DirectoryError([f"{where}: schema_version {manifest.schema_version}, this code reads "
                              f"{' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}"])
    if name != MANIFEST_NAME and manifest.schema_version != 1:
        raise DirectoryError([f"{where}: schema_version {manifest.schema_version} under the v1 name; v2 names it {MANIFEST_NAME}"])
    return AnnotatedDir(shown, fs, root, manifest, name)


_MANIFEST_FIELDS = {"schema_version": int, "tokenizer": dict, "scorers": list, "shards": list, "totals": dict,
                    "rejected": dict, "score_stats": dict, "config": dict, "created_by": str, "system_prompt": dict}
_OPTIONAL_FIELDS = {"config", "created_by", "system_prompt"}  # system_prompt: absent before the choice existed
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
