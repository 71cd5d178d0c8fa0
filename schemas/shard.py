"""Shard contract v2: the one place that names columns, metadata keys and the directory layout.

An annotated directory holds Parquet shards (one row per example) beside sidecar files whose names
start with ``_`` (``_manifest.json`` written last, ``_rejects.jsonl``, ``_annotate_summary.json``,
the dataset card ``_README.md``): a directory without a manifest is unfinished. The underscore is
the Spark/Hive convention that pyarrow's dataset discovery, DuckDB and ``datasets`` follow, so each
reads the directory as one table by its path alone. Annotate writes it, train reads it; neither
redefines anything here.

Versions: v2 is v1's shards (same columns and footers) with ``_``-prefixed sidecars; v1 named them
``manifest.json`` / ``rejects.jsonl``. Every reader accepts both (:func:`sidecar_path`);
``python -m schemas.migrate DIR`` renames a v1 directory's sidecars in place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 2  # what this code writes
READABLE_SCHEMA_VERSIONS = (1, 2)  # what it reads (manifests and shard footers)

# Base columns, in file order.
ID = "id"
SOURCE = "source"
INPUT_IDS = "input_ids"
LOSS_MASK = "loss_mask"
BASE_COLUMNS = (ID, SOURCE, INPUT_IDS, LOSS_MASK)

SCORE_PREFIX = "score_"
# A score derived at load time from two stored ones (Rho-1's excess loss, computed offline).
EXCESS_LOSS = "excess_loss"
BASE_LOSS, REF_LOSS = "base_loss", "ref_loss"  # scorer names; ref_loss alone is also Rho-1's online input
EXCESS_LOSS_PARTS = (BASE_LOSS, REF_LOSS)  # excess_loss = base_loss - ref_loss

METADATA_KEY = b"sftgo"  # Parquet key-value metadata: JSON of ShardMetadata
MANIFEST_NAME = "_manifest.json"
REJECTS_NAME = "_rejects.jsonl"
SUMMARY_NAME = "_annotate_summary.json"  # timings of the last annotate run (they vary run to run)
CARD_NAME = "_README.md"  # the dataset card (Hugging Face format; README.md would break pyarrow's discovery)
# Schema v1's names of the same files.
V1_SIDECAR_NAMES = {MANIFEST_NAME: "manifest.json", REJECTS_NAME: "rejects.jsonl", SUMMARY_NAME: "annotate_summary.json"}
SHARD_GLOB = "shard-*.parquet"
# A manifest names its shards by plain file name inside the directory (shard_name()); nothing else is read.
SHARD_FILE_NAME = re.compile(r"shard-[0-9]{5,}\.parquet")

# Quantile sketch resolution: the manifest stores score quantiles at p = i / QUANTILE_POINTS.
QUANTILE_POINTS = 1000
HISTOGRAM_BINS = 50


def shard_name(index: int) -> str:
    """File name of shard ``index`` inside an annotated directory."""
    return f"shard-{index:05d}.parquet"


def join(base: str | os.PathLike, name: str) -> str:
    """``base/name`` for a local path or a URI alike (``s3://b/d`` + ``x`` = ``s3://b/d/x``)."""
    return f"{str(base).rstrip('/')}/{name}"


def sidecar_path(root: str, name: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """``root/name``, or ``root/<v1 name>`` when only a schema-v1 directory's file of that name is there.

    ``exists`` tests a path (``fs.exists`` of an fsspec filesystem for remote directories).
    """
    path = join(root, name)
    legacy = V1_SIDECAR_NAMES.get(name)
    if legacy is not None and not exists(path):
        old = join(root, legacy)
        if exists(old):
            return old
    return path


def manifest_sha256(uri: str | os.PathLike) -> str:
    """sha256 of an annotated directory's manifest (local path or fsspec URI): names the data exactly."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(uri))
    with fs.open(sidecar_path(root, MANIFEST_NAME, fs.exists), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sidecar_name(name: str, schema_version: int) -> str:
    """The file name sidecar ``name`` has in a directory of ``schema_version`` (v1: no underscore)."""
    return V1_SIDECAR_NAMES.get(name, name) if schema_version == 1 else name


def score_column(scorer: str) -> str:
    """Column holding scorer ``scorer``'s per-token scores (float32 list aligned with input_ids)."""
    return SCORE_PREFIX + scorer


def scorer_of_column(column: str) -> str | None:
    """Inverse of :func:`score_column`; None for a column that is not a score column."""
    return column[len(SCORE_PREFIX):] if column.startswith(SCORE_PREFIX) else None


def arrow_schema(scorers: Iterable[str] = (), metadata: "ShardMetadata | None" = None) -> pa.Schema:
    """The Arrow schema of a shard (v1 and v2 alike) holding the given score columns (in the given order)."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(INPUT_IDS, pa.list_(pa.int32()), nullable=False),
        pa.field(LOSS_MASK, pa.list_(pa.bool_()), nullable=False),
    ]
    fields += [pa.field(score_column(s), pa.list_(pa.float32()), nullable=False) for s in scorers]
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: metadata.to_json().encode()})
    return schema


def example_id(content: Any) -> str:
    """Stable content-derived id: sha256 of the example's canonical JSON (its messages).

    The same conversation gets the same id in any file, so duplicates are found across corpora.
    """
    payload = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


SYSTEM_PROMPT_DEFAULT = "default"  # the chat template's own system turn (data/render.py)


def tokenizer_fingerprint(tokenizer: Any, system_prompt: str | None = None) -> dict[str, str]:
    """Name plus a hash of the vocabulary, special tokens and chat template of a HF tokenizer; with
    ``system_prompt`` (annotate's choice: default, none or a text) also that choice.

    Two tokenizers with the same hash produce the same ids for the same rendered text. The system-prompt
    choice is a key of its own, not part of the hash, so a refusal can name both choices (a fingerprint
    without it, from before the choice existed, means ``default``: :func:`system_prompt_of`).
    """
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = json.dumps(template, sort_keys=True)
    digest = hashlib.sha256()
    digest.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    digest.update(json.dumps(special, ensure_ascii=False).encode("utf-8"))
    digest.update(template.encode("utf-8"))
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    fingerprint = {"name": os.path.basename(str(name).rstrip("/")) or str(name), "sha256": digest.hexdigest()}
    if system_prompt is not None:
        fingerprint["system_prompt"] = system_prompt
    return fingerprint


def system_prompt_of(fingerprint: dict[str, str]) -> str:
    """The system-prompt choice a tokenizer fingerprint records; ``default`` where it has none (data annotated
    before the choice existed was rendered with the template's own behaviour)."""
    return fingerprint.get("system_prompt") or SYSTEM_PROMPT_DEFAULT


def same_fingerprint(a: dict[str, str], b: dict[str, str]) -> bool:
    """Equal fingerprints, a missing system-prompt choice counting as ``default``."""
    return {**a, "system_prompt": system_prompt_of(a)} == {**b, "system_prompt": system_prompt_of(b)}


@dataclass
class ScorerInfo:
    """What produced a score column: enough to reproduce it."""

    name: str
    model: str | None = None
    revision: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


def scorer_variant(info: ScorerInfo) -> str | None:
    """In words, which variant of its method a score column holds, where a scorer has variants that its name
    does not tell (None otherwise). tfidf: raw term counts (the paper's, the default since issue 27) or
    1 + log(tf) (``sublinear_tf``, the default before); a column whose options lack the key says so."""
    if info.name != "tfidf":
        return None
    if "sublinear_tf" not in info.params:
        return "term frequency not recorded (its options have no sublinear_tf): raw counts or 1 + log(tf) unknown"
    if info.params["sublinear_tf"]:
        return "1 + log(tf) (sublinear_tf=True: sftgo's variant, the default before issue 27), smoothed IDF"
    return "raw term counts (sublinear_tf=False: the paper's), smoothed IDF"


@dataclass
class ShardMetadata:
    """Per-file metadata (Parquet key-value metadata under ``METADATA_KEY``)."""

    schema_version: int
    tokenizer: dict[str, str]  # tokenizer_fingerprint()
    scorers: list[ScorerInfo]
    shard_index: int
    # Provenance of the rows: which input records this shard covers, so a rerun can tell done work.
    plan: dict[str, Any] = field(default_factory=dict)
    # Per-scorer quantile summary of this shard's trainable-token scores (see summarize_scores).
    score_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardMetadata":
        """Parse footer metadata; TypeError (or ValueError for bad JSON) when it is not a shard metadata object."""
        raw = json.loads(text)
        scorers = raw.get("scorers", []) if isinstance(raw, dict) else None
        if not isinstance(scorers, list) or not all(isinstance(s, dict) for s in scorers):
            raise TypeError(f"footer metadata is not an object with a list of scorer objects: {str(raw)[:60]!r}")
        raw["scorers"] = [ScorerInfo(**s) for s in scorers]
        return cls(**raw)

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> "ShardMetadata":
        """Read from a Parquet/Arrow schema; KeyError when the file carries no sftgo metadata."""
        meta = schema.metadata or {}
        if METADATA_KEY not in meta:
            raise KeyError(f"no '{METADATA_KEY.decode()}' key in the file metadata")
        return cls.from_json(meta[METADATA_KEY])


# ---------------------------------------------------------------------------------------------
# Score statistics: a mergeable quantile sketch, so a corpus-wide threshold needs no data pass.
# ---------------------------------------------------------------------------------------------


def summarize_scores(values: np.ndarray) -> dict[str, Any]:
    """Quantile summary of one shard's trainable-token scores for one scorer.

    Holds count, sum, min, max and the values at p = i / QUANTILE_POINTS; summaries of several
    shards merge with :func:`merge_summaries` (rank error at most 1 / QUANTILE_POINTS per part).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"count": 0, "sum": 0.0, "min": None, "max": None, "quantiles": []}
    probs = np.linspace(0.0, 1.0, QUANTILE_POINTS + 1)
    return {
        "count": int(values.size),
        "sum": float(values.sum()),
        "min": float(values.min()),
        "max": float(values.max()),
        "quantiles": np.quantile(values, probs).tolist(),
    }


def merge_summaries(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge quantile summaries; the result adds mean and a histogram for reports."""
    parts = [p for p in parts if p and p.get("count", 0) > 0]
    if not parts:
        return {"count": 0, "sum": 0.0, "mean": None, "min": None, "max": None, "quantiles": [], "histogram": None}
    count = sum(p["count"] for p in parts)
    total = sum(p["sum"] for p in parts)
    lo = min(p["min"] for p in parts)
    hi = max(p["max"] for p in parts)
    if len(parts) == 1:
        quantiles = list(parts[0]["quantiles"])
    else:
        # Each part's quantile points stand for count / (points) values each: a weighted sample.
        points = np.concatenate([np.asarray(p["quantiles"], dtype=np.float64) for p in parts])
        weights = np.concatenate([np.full(len(p["quantiles"]), p["count"] / len(p["quantiles"])) for p in parts])
        order = np.argsort(points, kind="stable")
        points, weights = points[order], weights[order]
        cdf = (np.cumsum(weights) - 0.5 * weights) / weights.sum()
        probs = np.linspace(0.0, 1.0, QUANTILE_POINTS + 1)
        quantiles = np.interp(probs, cdf, points).tolist()
        quantiles[0], quantiles[-1] = lo, hi
    return {
        "count": count,
        "sum": total,
        "mean": total / count,
        "min": lo,
        "max": hi,
        "quantiles": quantiles,
        "histogram": _histogram_from_quantiles(quantiles, count, lo, hi),
    }


def _histogram_from_quantiles(quantiles: list[float], count: int, lo: float, hi: float) -> dict[str, list]:
    """Approximate equal-width histogram (HISTOGRAM_BINS bins) implied by the quantile sketch."""
    if hi <= lo:
        return {"edges": [lo, hi], "counts": [count]}
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
    probs = np.linspace(0.0, 1.0, len(quantiles))
    q = np.asarray(quantiles)
    # CDF at each edge: the largest p with quantile(p) <= edge (monotone interpolation).
    cdf = np.interp(edges, q, probs, left=0.0, right=1.0)
    cdf[-1] = 1.0
    counts = np.diff(cdf) * count
    return {"edges": edges.tolist(), "counts": np.round(counts).astype(int).tolist()}


def quantile_from_summary(summary: dict[str, Any], rho: float) -> float:
    """The rho-quantile of a scorer's trainable-token scores, read from a (merged) summary."""
    quantiles = summary.get("quantiles") or []
    if not quantiles:
        raise ValueError("the summary holds no scores")
    probs = np.linspace(0.0, 1.0, len(quantiles))
    return float(np.interp(rho, probs, quantiles))


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


@dataclass
class ShardEntry:
    path: str  # relative to the manifest's directory
    rows: int
    tokens: int
    trainable_tokens: int
    sha256: str


@dataclass
class Manifest:
    """``_manifest.json``: the index of an annotated directory, written last."""

    schema_version: int
    tokenizer: dict[str, str]
    scorers: list[ScorerInfo]
    shards: list[ShardEntry]
    totals: dict[str, int]  # rows, tokens, trainable_tokens, shards
    rejected: dict[str, int]  # reason -> count
    score_stats: dict[str, dict[str, Any]]  # scorer (and excess_loss) -> merge_summaries()
    config: dict[str, Any] = field(default_factory=dict)  # the annotate run's resolved config
    created_by: str = "sftgo.annotate"
    # The system-prompt choice (also in ``tokenizer``, which the trainer checks) and the chat template's own
    # system turn: {choice, template_turn, and under default template_turn_tokens, rows_with_template_turn,
    # template_turn_token_share}. Empty in manifests written before the choice existed (= default).
    system_prompt: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        """Parse a manifest; ValueError (naming the entry) for a shard path that is not a plain shard
        file name inside the directory: a manifest from elsewhere must not point readers outside it."""
        raw = dict(raw)
        raw["scorers"] = [ScorerInfo(**s) for s in raw.get("scorers", [])]
        raw["shards"] = [ShardEntry(**s) for s in raw.get("shards", [])]
        check_shard_paths([entry.path for entry in raw["shards"]])
        return cls(**raw)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Manifest":
        """The manifest of an annotated directory (local path or fsspec URI), read and checked by
        :func:`schemas.directory.open_directory` (ValueError naming the file)."""
        from schemas.directory import open_directory  # that module builds on this one

        return open_directory(directory).manifest

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @property
    def scorer_names(self) -> list[str]:
        return [s.name for s in self.scorers]


def check_shard_paths(paths: list[Any]) -> None:
    """Refuse (ValueError) shard paths other than unique ``shard-NNNNN.parquet`` names: no ``..``, no
    absolute paths, no sub-folders, no URI schemes, no duplicates."""
    seen: dict[str, int] = {}
    for index, path in enumerate(paths):
        if not isinstance(path, str) or not SHARD_FILE_NAME.fullmatch(path):
            raise ValueError(f"manifest shards[{index}].path {path!r}: not a shard file name inside the directory "
                             f"(expected shard-NNNNN.parquet; '..', absolute paths, sub-folders and URI schemes are refused)")
        if path in seen:
            raise ValueError(f"manifest shards[{index}].path {path!r}: listed twice (also shards[{seen[path]}])")
        seen[path] = index


def score_names(scorers: Iterable[str]) -> list[str]:
    """Scores a directory with these scorers offers at load time (stored ones plus derived ones)."""
    names = list(scorers)
    if all(part in names for part in EXCESS_LOSS_PARTS):
        names.append(EXCESS_LOSS)
    return names


def has_score(manifest: Manifest, name: str) -> bool:
    """True when training can load score ``name``: a stored scorer, or excess_loss with both its parts stored."""
    return name in score_names(manifest.scorer_names)


def has_ref_loss(manifest: Manifest) -> bool:
    """True when ``ref_loss`` is stored (what Rho-1's online loss reads per token)."""
    return REF_LOSS in manifest.scorer_names


# Likely causes of a score that is the same on every trainable token, by scorer.
_NO_SPREAD_CAUSES = {
    EXCESS_LOSS: f"{REF_LOSS} was computed with the base model itself (excess_loss of a model against itself); "
                 f"re-annotate with --add-scorers {REF_LOSS} --scorer-option {REF_LOSS}.model=REFERENCE (another model)",
    "tfidf": "a corpus of one example, or examples that are one repeated term",
}
# Relative spread below which a score counts as constant (float32 scores; rounding of equal values).
NO_SPREAD_TOLERANCE = 1e-6


def score_spread_problem(manifest: Manifest, name: str, where: str = "the data") -> str | None:
    """Why score ``name`` of ``manifest`` cannot rank tokens (None when it can): it has the same value on every
    trainable token, so groups or weights drawn from it are arbitrary (ties) or uniform.

    Read from the manifest alone: ``score_stats[name]`` holds the exact min and max over the trainable tokens
    (a shard's are exact, and merging takes the min of the mins), for excess_loss too, whose statistics annotate
    computes from the per-token differences base_loss - ref_loss, not from the two columns' own statistics.
    For excess_loss the scorer metadata also settles the case of a model against itself, whatever its rounding
    (bf16, another batching): ref_loss's model and revision equal base_loss's."""
    if name == EXCESS_LOSS:
        infos = {s.name: s for s in manifest.scorers}
        base, ref = infos.get(BASE_LOSS), infos.get(REF_LOSS)
        if base is not None and ref is not None and base.model and ref.model and \
                str(base.model).rstrip("/") == str(ref.model).rstrip("/") and base.revision == ref.revision:
            return (f"importance.scorer: {EXCESS_LOSS} in {where} is 0 up to rounding: {REF_LOSS} and {BASE_LOSS} were "
                    f"computed with the same model ({ref.model}, revision {ref.revision}); likely cause: "
                    f"{_NO_SPREAD_CAUSES[EXCESS_LOSS]}")
    stats = manifest.score_stats.get(name) or {}
    lo, hi, count = stats.get("min"), stats.get("max"), stats.get("count", 0)
    if not count or lo is None or hi is None or count < 2:
        return None
    if hi - lo > NO_SPREAD_TOLERANCE * max(1.0, abs(lo), abs(hi)):
        return None
    cause = _NO_SPREAD_CAUSES.get(name, f"the {name} scorer's model or options give every token the same value")
    return (f"importance.scorer: {name!r} has no spread in {where}: {lo:.6g} on all {count:,} trainable tokens, so its "
            f"important / unimportant groups (or weights) would be arbitrary; likely cause: {cause}")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def program(default: str) -> str:
    """A command's name for its usage line: the console script's (``sftgo-validate``) when it was started through one,
    else ``default`` (``python -m schemas.validate``, ``python train/main.py``)."""
    import sys

    name = Path(sys.argv[0]).name
    return name if name.startswith("sftgo-") else default


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so readers see the old content or the new, never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not exc.filename:  # a full disk's error names no file: name it
            raise OSError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def first_non_finite(values: np.ndarray, offsets: np.ndarray) -> int | None:
    """The first row holding a NaN or infinite value, or None when all are finite.

    ``values``: a list column's values, flattened; ``offsets``: its row offsets (Arrow's: ``n + 1``
    entries, row ``i`` is ``values[offsets[i]:offsets[i + 1]]``, from 0).
    """
    bad = np.flatnonzero(~np.isfinite(values))
    if not bad.size:
        return None
    return int(np.searchsorted(offsets, bad[0], side="right")) - 1


def ceil_count(fraction: float, n: int) -> int:
    """ceil(fraction * n) robust to float error (e.g. (1 - 0.7) * 10 = 3.0000000000000004)."""
    return int(math.ceil(round(fraction * n, 9)))
