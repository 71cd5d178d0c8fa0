"""Statistics and samples of an annotated directory: summary, exact quantiles, examples, scorer agreement.

    from data.shard_stats import summarize, sample_examples, scorer_agreement
    summary = summarize("shards/demo")                       # counts and per-score statistics
    examples = sample_examples("shards/demo", n=8, seed=0)   # a few rows, read lazily

Shared by ``python -m annotate.view`` and ``evaluation.report`` (the HTML is data/viewer.py). The
directory is opened by schemas.directory (a local path or a URI); the shards are read through lazy
Polars scans of the files its manifest lists: statistics are streaming aggregations (only
``loss_mask`` and the score columns are read), samples read only the rows they show, so a directory
larger than memory can be inspected.

"Trainable" follows training (train/shards.py, METHOD.md): a token is trainable when its stored
``loss_mask`` is true and it is not position 0 (position 0 predicts nothing). Scores at other
positions are ignored by every statistic here. Important tokens (group 1) come from the grouping
rule training uses (data/grouping.py), so what the viewer marks is what training would use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from schemas.directory import AnnotatedDir, open_directory
from schemas.shard import (
    EXCESS_LOSS,
    EXCESS_LOSS_PARTS,
    ID,
    INPUT_IDS,
    LOSS_MASK,
    REJECTS_NAME,
    SOURCE,
    arrow_schema,
    score_column,
    score_names,
    scorer_variant,
)

__all__ = [
    "scan_shards",
    "trainable_tokens",
    "summarize",
    "sample_examples",
    "trainable_mask",
    "corpus_thresholds",
    "important_masks",
    "realised_important_share",
    "important_share_warning",
    "scorer_agreement",
]


QUANTILES = {"p05": 0.05, "p50": 0.5, "p95": 0.95}
REJECT_EXAMPLES_PER_REASON = 3

# Exact quantiles in bounded memory: histogram the values (HIST_BINS bins), zoom into the bins that
# hold the wanted ranks, and read the values of a bin only once it holds at most COLLECT_LIMIT.
HIST_BINS = 4096
COLLECT_LIMIT = 1 << 20
MAX_ZOOMS = 8


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def _shard_paths(d: AnnotatedDir) -> list[str]:
    """The shards as Polars reads them: local paths (each checked to exist), else the URIs as given."""
    if not isinstance(d.fs, LocalFileSystem):
        return d.shard_uris
    for path in d.shard_paths:
        if not os.path.isfile(path):
            raise ValueError(f"{path}: shard listed in {d.manifest_name} is missing")
    return d.shard_paths


def _scan(paths: list[str], scorers: list[str], storage_options: dict[str, Any] | None = None):
    import polars as pl

    if not paths:  # a manifest with no shard: an empty frame with the contract's columns
        return pl.from_arrow(arrow_schema(scorers).empty_table()).lazy()
    return pl.scan_parquet(paths, storage_options=storage_options, hive_partitioning=False)


def scan_shards(shards_dir: str, storage_options: dict[str, Any] | None = None) -> "polars.LazyFrame":  # noqa: F821
    """Lazy Polars scan over the shards that ``shards_dir/_manifest.json`` lists (nothing read yet).

    ``shards_dir`` is a local directory or a URI Polars reads natively (``s3://``, ``gs://``,
    ``az://``, ``https://``; credentials from the environment or ``storage_options``). Raises
    ValueError naming the directory when the manifest is missing or unreadable, or a listed local
    shard is missing.
    """
    d = open_directory(shards_dir)
    return _scan(_shard_paths(d), d.manifest.scorer_names, storage_options)


def _unreadable(d: AnnotatedDir, exc: Exception) -> ValueError:
    """A ValueError naming the first shard whose footer cannot be read, else the directory."""
    import pyarrow.parquet as pq

    if isinstance(d.fs, LocalFileSystem):
        for path in _shard_paths(d):
            try:
                pq.read_metadata(path)
            except Exception as bad:  # noqa: BLE001 - any failure names the file
                return ValueError(f"{path}: not a readable Parquet file ({bad})")
    return ValueError(f"{d.uri}: could not read the shards ({type(exc).__name__}: {exc}); "
                      f"check them with python -m schemas.validate {d.uri}")


def _collect_all(d: AnnotatedDir, frames: list) -> list:
    import polars as pl

    try:
        return pl.collect_all(frames, engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise _unreadable(d, exc) from None


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def _score_exprs(scorers: list[str]) -> dict[str, Any]:
    """Score name -> Float64 expression over the exploded token frame (excess_loss derived)."""
    import polars as pl

    exprs = {name: pl.col(score_column(name)).cast(pl.Float64) for name in scorers}
    if EXCESS_LOSS in score_names(scorers):
        base, ref = (score_column(part) for part in EXCESS_LOSS_PARTS)
        # float32 difference, as train/shards.py computes it; statistics in float64.
        exprs[EXCESS_LOSS] = (pl.col(base) - pl.col(ref)).cast(pl.Float64)
    return exprs


def trainable_tokens(lf, scorers: list[str]):
    """One row per trainable token (position 0 dropped, loss_mask true) with the score columns."""
    import polars as pl

    columns = [LOSS_MASK] + [score_column(name) for name in scorers]
    return (
        lf.select([pl.col(c).list.slice(1) for c in columns])  # position 0 is never trainable
        .explode(columns)
        .filter(pl.col(LOSS_MASK))
    )


def _quantile_ranks(count: int) -> dict[str, tuple[int, int, float]]:
    """numpy's linear quantile as (lower rank, upper rank, weight of the upper) per quantile name."""
    out = {}
    for key, p in QUANTILES.items():
        h = (count - 1) * p
        lo = int(math.floor(h))
        out[key] = (lo, min(lo + 1, count - 1), h - lo)
    return out


def _exact_values(d: AnnotatedDir, tokens, exprs: dict[str, Any],
                  wanted: dict[str, tuple[float, float, set[int]]]) -> dict[str, dict[int, float]]:
    """Exact order statistics: for each score, the values at the wanted 0-based ranks among its finite values.

    ``wanted``: name -> (min, max, ranks). Memory stays bounded by the histogram and by
    COLLECT_LIMIT values per wanted bin, however large the directory.
    """
    import polars as pl

    found: dict[str, dict[int, float]] = {name: {} for name in wanted}
    # Open windows: name -> list of (lo, hi, rank of the window's first value, ranks inside it).
    windows = {name: [(lo, hi, 0, set(ranks))] for name, (lo, hi, ranks) in wanted.items() if ranks}
    to_read: dict[str, list[tuple[float, float, int, set[int]]]] = {name: [] for name in wanted}
    for zoom in range(MAX_ZOOMS + 1):
        names = [name for name, ws in windows.items() if ws]
        if not names:
            break
        frames = []
        for name in names:
            x = pl.col("x")
            win = pl.lit(None, dtype=pl.Int32)
            lo_e, width_e = pl.lit(0.0), pl.lit(1.0)
            inside = pl.lit(False)
            for index, (lo, hi, _, _) in reversed(list(enumerate(windows[name]))):
                cond = (x >= lo) & (x <= hi)
                win = pl.when(cond).then(pl.lit(index, dtype=pl.Int32)).otherwise(win)
                lo_e = pl.when(cond).then(pl.lit(lo)).otherwise(lo_e)
                width_e = pl.when(cond).then(pl.lit(hi - lo if hi > lo else 1.0)).otherwise(width_e)
                inside = inside | cond
            bin_e = ((x - lo_e) / width_e * HIST_BINS).floor().clip(0, HIST_BINS - 1).cast(pl.Int32)
            frames.append(
                tokens.select(exprs[name].alias("x")).filter(x.is_finite() & inside)
                .select(x, win.alias("w"), bin_e.alias("b"))
                .group_by("w", "b").agg(pl.len().alias("n"), x.min().alias("lo"), x.max().alias("hi"))
                .sort("w", "b")
            )
        results = _collect_all(d, frames)
        for name, hist in zip(names, results):
            next_windows = []
            for index, (lo, hi, base, ranks) in enumerate(windows[name]):
                part = hist.filter(pl.col("w") == index)
                counts = part["n"].to_numpy().astype(np.int64)
                ends = base + np.cumsum(counts)
                by_bin: dict[int, set[int]] = {}
                for rank in ranks:
                    by_bin.setdefault(int(np.searchsorted(ends, rank, side="right")), set()).add(rank)
                for row, rs in by_bin.items():
                    b_lo, b_hi, n = float(part["lo"][row]), float(part["hi"][row]), int(counts[row])
                    start = int(ends[row] - n)
                    if b_lo == b_hi:  # every value of the bin is the same: known without reading it
                        found[name].update({rank: b_lo for rank in rs})
                    elif n <= COLLECT_LIMIT or zoom == MAX_ZOOMS:
                        to_read[name].append((b_lo, b_hi, start, rs))
                    else:
                        next_windows.append((b_lo, b_hi, start, rs))
            windows[name] = next_windows
    frames, names = [], []
    for name, ranges in to_read.items():
        if not ranges:
            continue
        x = pl.col("x")
        cond = pl.lit(False)
        for lo, hi, _, _ in ranges:
            cond = cond | ((x >= lo) & (x <= hi))
        frames.append(tokens.select(exprs[name].alias("x")).filter(x.is_finite() & cond))
        names.append(name)
    for name, values in zip(names, _collect_all(d, frames)):
        array = np.sort(values["x"].to_numpy())
        for lo, hi, start, ranks in to_read[name]:
            inside = array[(array >= lo) & (array <= hi)]
            for rank in ranks:
                found[name][rank] = float(inside[rank - start])
    return found


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_rejects(d: AnnotatedDir, per_reason: int = REJECT_EXAMPLES_PER_REASON) -> list[dict[str, Any]]:
    """The first ``per_reason`` lines of _rejects.jsonl for each reason (file, line, reason, detail)."""
    wanted = set(d.manifest.rejected)
    seen: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    try:
        with d.fs.open(d.sidecar(REJECTS_NAME), "r", encoding="utf-8") as f:
            for text in f:
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    continue
                reason = str(record.get("reason", "?"))
                if seen.get(reason, 0) >= per_reason:
                    if wanted and all(seen.get(r, 0) >= per_reason for r in wanted):
                        break
                    continue
                seen[reason] = seen.get(reason, 0) + 1
                detail = str(record.get("detail", ""))
                examples.append({"file": str(record.get("file", "?")), "line": record.get("line"), "reason": reason,
                                 "detail": detail if len(detail) <= 200 else detail[:199] + "…"})
    except (FileNotFoundError, OSError, UnicodeDecodeError):
        return examples
    return examples


def summarize(shards_dir: str) -> dict[str, Any]:
    """Counts and per-score statistics of an annotated directory, from streaming Polars scans.

    Returns a JSON-serializable dict:
        ``dir``, ``rows``, ``tokens``, ``trainable_tokens`` (loss_mask true and not position 0, as in
        training), ``rows_without_trainable``, ``shards``, ``scorers`` (stored), ``scores`` (loadable:
        stored plus ``excess_loss`` when derivable), ``stats`` {score: {count, mean, std, min, p05,
        p50, p95, max, nan, inf}} over trainable tokens (count and the rest over finite values; std
        is the population std; quantiles exact, numpy's linear rule; None when there is no value),
        ``rejects`` {total, by_reason, examples: [{file, line, reason, detail}]}, ``sources``
        {source: rows}, ``tokenizer`` (manifest fingerprint), ``model`` (manifest config["model"]),
        ``manifest_totals`` (as annotate recorded them).

    The data is read three times at most (counts and moments, histograms, the few values near each
    quantile), each pass a streaming scan of ``loss_mask`` and the score columns only.
    """
    import polars as pl

    d = open_directory(shards_dir)
    manifest, scorers = d.manifest, d.manifest.scorer_names
    lf = _scan(_shard_paths(d), scorers)
    exprs = _score_exprs(scorers)
    tokens = trainable_tokens(lf, scorers)

    counts_q = lf.select(
        pl.len().alias("rows"),
        pl.col(LOSS_MASK).list.len().sum().alias("tokens"),
        (~pl.col(LOSS_MASK).list.slice(1).list.any()).sum().alias("rows_without_trainable"),
    )
    sources_q = lf.group_by(SOURCE).agg(pl.len().alias("rows")).sort(["rows", SOURCE], descending=[True, False])
    aggs = [pl.len().alias("trainable")]
    for name, x in exprs.items():
        finite = x.filter(x.is_finite())
        aggs += [
            finite.count().alias(f"{name}|count"),
            finite.mean().alias(f"{name}|mean"),
            finite.std(ddof=0).alias(f"{name}|std"),
            finite.min().alias(f"{name}|min"),
            finite.max().alias(f"{name}|max"),
            x.is_nan().sum().alias(f"{name}|nan"),
            x.is_infinite().sum().alias(f"{name}|inf"),
        ]
    moments_q = tokens.select(aggs)
    counts, sources, moments = _collect_all(d, [counts_q, sources_q, moments_q])
    m = moments.row(0, named=True)

    stats: dict[str, dict[str, Any]] = {}
    wanted: dict[str, tuple[float, float, set[int]]] = {}
    for name in exprs:
        count = int(m[f"{name}|count"] or 0)
        stats[name] = {
            "count": count,
            "mean": _finite_or_none(m[f"{name}|mean"]) if count else None,
            "std": _finite_or_none(m[f"{name}|std"]) if count else None,
            "min": _finite_or_none(m[f"{name}|min"]) if count else None,
            **{key: None for key in QUANTILES},
            "max": _finite_or_none(m[f"{name}|max"]) if count else None,
            "nan": int(m[f"{name}|nan"] or 0),
            "inf": int(m[f"{name}|inf"] or 0),
        }
        if count:
            ranks = {r for lo, hi, _ in _quantile_ranks(count).values() for r in (lo, hi)}
            wanted[name] = (stats[name]["min"], stats[name]["max"], ranks)
    values = _exact_values(d, tokens, exprs, wanted) if wanted else {}
    for name, found in values.items():
        for key, (lo, hi, weight) in _quantile_ranks(stats[name]["count"]).items():
            a, b = found[lo], found[hi]
            stats[name][key] = a + weight * (b - a) if weight else a

    c = counts.row(0, named=True)
    by_reason = {str(k): int(v) for k, v in manifest.rejected.items()}
    return {
        "dir": d.uri,
        "rows": int(c["rows"] or 0),
        "tokens": int(c["tokens"] or 0),
        "trainable_tokens": int(m["trainable"] or 0),
        "rows_without_trainable": int(c["rows_without_trainable"] or 0),
        "shards": len(manifest.shards),
        "scorers": list(scorers),
        "variants": {info.name: variant for info in manifest.scorers if (variant := scorer_variant(info)) is not None},
        "scores": list(exprs),
        "stats": stats,
        "rejects": {"total": sum(by_reason.values()), "by_reason": by_reason,
                    "examples": _read_rejects(d) if by_reason else []},
        "sources": {str(s): int(n) for s, n in zip(sources[SOURCE].to_list(), sources["rows"].to_list())},
        "tokenizer": dict(manifest.tokenizer),
        "model": manifest.config.get("model") if isinstance(manifest.config, dict) else None,
        "manifest_totals": dict(manifest.totals),
    }


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def _example_of(row: dict[str, Any], scorers: list[str]) -> dict[str, Any]:
    stored = {name: np.asarray(row[score_column(name)], dtype=np.float32) for name in scorers}
    scores = {name: values.tolist() for name, values in stored.items()}
    if EXCESS_LOSS in score_names(scorers):
        base, ref = (stored[part] for part in EXCESS_LOSS_PARTS)
        scores[EXCESS_LOSS] = (base - ref).tolist()  # float32 difference, as training computes it
    return {
        "id": str(row[ID]),
        "source": str(row[SOURCE]),
        "input_ids": [int(i) for i in row[INPUT_IDS]],
        "loss_mask": [bool(b) for b in row[LOSS_MASK]],
        "scores": scores,
    }


def sample_examples(shards_dir: str, n: int = 8, seed: int = 0, ids: list[str] | None = None) -> list[dict[str, Any]]:
    """A deterministic sample of ``n`` examples (or the examples with the given ``ids``).

    Rows are picked from the manifest's row counts with ``numpy.random.default_rng(seed)`` (same
    seed, same directory: same rows), returned in file order; only the picked rows' row groups are
    read. With ``ids``, the ``id`` column is scanned and the matching rows returned in the order of
    ``ids`` (ValueError for an id not found). Each example: ``{"id", "source", "input_ids",
    "loss_mask", "scores": {score name: per-token floats}}`` with ``excess_loss`` derived
    (base_loss - ref_loss, float32) when both are stored. ``loss_mask`` is as stored.
    """
    import polars as pl

    d = open_directory(shards_dir)
    uri, manifest, scorers = d.uri, d.manifest, d.manifest.scorer_names
    paths = _shard_paths(d)
    if ids is not None:
        ids = [str(i) for i in ids]
        frame = _collect_all(d, [_scan(paths, scorers).filter(pl.col(ID).is_in(ids))])[0]
        rows = {row[ID]: row for row in frame.iter_rows(named=True)}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(f"{uri}: no example with id {', '.join(missing[:5])}" + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
        return [_example_of(rows[i], scorers) for i in ids]
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    counts = np.array([entry.rows for entry in manifest.shards], dtype=np.int64)
    total = int(counts.sum())
    n = min(int(n), total)
    if n == 0:
        return []
    picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    frames = []
    for pick in picks:
        shard = int(np.searchsorted(starts, pick, side="right")) - 1
        frames.append(pl.scan_parquet(paths[shard], hive_partitioning=False).slice(int(pick - starts[shard]), 1))
    frame = _collect_all(d, [pl.concat(frames, how="vertical")])[0]
    if frame.height != n:
        raise ValueError(f"{uri}: the shards hold fewer rows than {d.manifest_name} says; check them with "
                         f"python -m schemas.validate {uri}")
    return [_example_of(row, scorers) for row in frame.iter_rows(named=True)]


# ---------------------------------------------------------------------------------------------
# Important tokens (training's rule)
# ---------------------------------------------------------------------------------------------


def trainable_mask(loss_mask: Iterable[bool]) -> np.ndarray:
    """Training's trainable tokens of one example: the stored ``loss_mask`` without position 0."""
    mask = np.array(list(loss_mask), dtype=bool)
    mask[:1] = False  # position 0 predicts nothing (train/shards.py)
    return mask


def corpus_thresholds(shards_dir: str, rho: float) -> dict[str, "CorpusCut"]:  # noqa: F821
    """Scope ``corpus`` cuts: per score, the rho-quantile of the manifest's score_stats sketch and the
    share of tokens tied at it that are important (what training uses: data.grouping.corpus_cut;
    ``float(cut)`` is the threshold). Scores without stats are left out."""
    from data.grouping import check_rho, corpus_cut

    check_rho(rho)
    manifest = open_directory(shards_dir).manifest
    out = {}
    for name in score_names(manifest.scorer_names):
        summary = manifest.score_stats.get(name)
        if summary and summary.get("quantiles"):
            out[name] = corpus_cut(summary, rho)
    return out


def important_masks(example: dict[str, Any], rho: float, scope: str = "sequence",
                    thresholds: dict[str, Any] | None = None) -> dict[str, list[bool]]:
    """Per score of ``example``, its important-token mask at ``rho``, by training's rule (data/grouping.py).

    ``data.grouping.important_masks`` on the example alone: ``sequence``; ``batch``: the example is its own
    batch (the same rule); ``corpus``: the cut ``thresholds[name]`` (see :func:`corpus_thresholds`). Ties are broken
    by the tie keys of the example's ``id`` and positions, as in training. Position 0 is never
    trainable, hence never important. A score with NaN at a trainable token cannot be ranked
    (training refuses it): it is left out of the result.
    """
    import torch  # torch (and the grouping rule) only when groups are asked for

    from data.grouping import SCOPES
    from data.grouping import important_masks as group

    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    if scope == "corpus" and thresholds is None:
        raise ValueError("scope 'corpus' needs thresholds: corpus_thresholds(shards_dir, rho)")
    mask = torch.from_numpy(trainable_mask(example["loss_mask"]))
    example_id = example.get("id")
    ids = [None if example_id is None else [str(example_id)]]
    out = {}
    for name, values in example["scores"].items():
        scores = torch.tensor(np.asarray(values, dtype=np.float32))
        if scores.shape != mask.shape:
            raise ValueError(f"example {example.get('id')}: {name} has {scores.numel()} scores for {mask.numel()} tokens")
        if torch.isnan(scores[mask]).any():
            continue
        if scope == "corpus" and name not in thresholds:
            raise ValueError(f"no corpus threshold for {name!r} (have {sorted(thresholds)})")
        cut = thresholds[name] if scope == "corpus" else None
        out[name] = group([scores], [mask], rho, scope, cut, seq_lens=[[mask.numel()]], ids=ids)[0].tolist()
    return out


#: |realised important share - (1 - rho)| above this is worth a warning at the start of training.
SHARE_TOLERANCE = 0.05


def realised_important_share(shards_dir: str, score: str, rho: float, scope: str = "sequence",
                             exact: bool = False) -> dict[str, Any]:
    """The share of trainable tokens the grouping rule makes important over a directory, vs ``1 - rho``.

    ``sequence``: exact, from one cheap pass over the ``loss_mask`` column only (per example
    ``ceil((1 - rho) * n_i)`` of its ``n_i`` trainable tokens; short responses push the share above
    ``1 - rho``, e.g. a 1-token answer is 100% important). ``batch``: ``1 - rho`` (one ceiling over
    each step's thousands of tokens; the packing decides the rest). ``corpus``: from the manifest's
    sketch (:func:`data.grouping.corpus_cut`'s ``expected_share``; no pass), or with ``exact`` one
    pass over ``id``, ``loss_mask`` and the score, applying the cut token by token (it holds the id
    and position of every token tied at the threshold in memory: for checks and tests, not a
    billion-token corpus with a point mass).

    Returns ``{"share", "target" (1 - rho), "difference" (share - target), "differs" (|difference|
    > SHARE_TOLERANCE), "tokens" (trainable tokens; None when not counted), "important_tokens",
    "scope", "score", "rho", "method"}``.
    """
    import polars as pl

    from data.grouping import SCOPES, check_rho, corpus_cut, hashed_keys, id_hash

    check_rho(rho)
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {SCOPES}")
    d = open_directory(shards_dir)
    scorers = d.manifest.scorer_names
    if score not in score_names(scorers):
        raise ValueError(f"{d.uri}: no score {score!r} (it has {score_names(scorers)})")
    target = 1.0 - rho
    tokens = important = None
    if scope == "sequence":
        lf = _scan(_shard_paths(d), scorers)
        n = pl.col(LOSS_MASK).list.slice(1).list.sum().cast(pl.Int64)  # position 0 is never trainable
        counts = _collect_all(d, [lf.select(n.alias("n"))])[0]["n"].to_numpy()
        counts = counts[counts > 0]
        tokens = int(counts.sum())
        # ceil((1 - rho) * n) per example, robust to float error like schemas.shard.ceil_count.
        important = int(np.ceil(np.round(target * counts, 9)).sum())
        share, method = (important / tokens if tokens else target), "loss_mask pass: sum of per-example ceilings"
    elif scope == "batch":
        share, method = target, "1 - rho: one ceiling over each optimizer step's trainable tokens"
    else:
        summary = d.manifest.score_stats.get(score)
        if not summary or not summary.get("quantiles"):
            raise ValueError(f"{d.uri}: manifest has no score_stats for {score!r}; use the sequence or batch scope")
        cut = corpus_cut(summary, rho)
        share, method = float(cut.expected_share), "manifest sketch: share above the threshold + tie fraction x share tied"
        if exact:
            lf = _scan(_shard_paths(d), scorers)
            value = _score_exprs(scorers)[score]
            frame = lf.select(
                pl.col(ID).cast(pl.String),
                pl.int_ranges(0, pl.col(LOSS_MASK).list.len()).alias("pos"),
                pl.col(LOSS_MASK),
                *[pl.col(score_column(name)) for name in (EXCESS_LOSS_PARTS if score == EXCESS_LOSS else [score])],
            )
            listed = ["pos", LOSS_MASK] + [score_column(name) for name in (EXCESS_LOSS_PARTS if score == EXCESS_LOSS else [score])]
            tokens_lf = (frame.select([pl.col(ID)] + [pl.col(c).list.slice(1) for c in listed]).explode(listed)
                         .filter(pl.col(LOSS_MASK)).select(pl.col(ID), pl.col("pos"), value.alias("s")))
            above_lf = tokens_lf.select((pl.col("s") > cut.threshold).sum().alias("above"), pl.len().alias("n"))
            tied_lf = tokens_lf.filter(pl.col("s") == cut.threshold).select(pl.col(ID), pl.col("pos"))
            counted, tied = _collect_all(d, [above_lf, tied_lf])
            tokens = int(counted["n"][0])
            important = int(counted["above"][0] or 0)
            if tied.height:
                # One BLAKE2b per example id, joined back to its tied tokens.
                unique = tied[ID].unique()
                hashes = pl.DataFrame({ID: unique, "h": pl.Series([id_hash(i) for i in unique.to_list()], dtype=pl.UInt64)})
                tied = tied.join(hashes, on=ID, how="left")
                keys = hashed_keys(tied["h"].to_numpy(), tied["pos"].to_numpy())
                important += int((keys < cut.tie_fraction).sum())
            share = important / tokens if tokens else target
            method = "exact pass: score > threshold, or tied and tie key < tie fraction"
    return {"share": share, "target": target, "difference": share - target,
            "differs": abs(share - target) > SHARE_TOLERANCE, "tokens": tokens, "important_tokens": important,
            "scope": scope, "score": score, "rho": rho, "method": method}


def important_share_warning(result: dict[str, Any]) -> str | None:
    """The line to log when :func:`realised_important_share`'s share is off ``1 - rho`` by more than
    SHARE_TOLERANCE (None otherwise)."""
    if not result["differs"]:
        return None
    return (f"realised important share {result['share']:.3f} differs from 1 - rho = {result['target']:.3f} "
            f"(scope {result['scope']}, score {result['score']}; {result['method']})")


# ---------------------------------------------------------------------------------------------
# Agreement between scorers
# ---------------------------------------------------------------------------------------------


def scorer_agreement(shards_dir: str, rho: float, max_examples: int = 2000, scope: str = "sequence") -> dict[str, Any]:
    """How much the scores agree on which tokens are important at ``rho``.

    Reads ``loss_mask`` and the score columns of the first ``max_examples`` rows (file order) only.
    ``overlap[i][j]`` is the mean over examples of |A_i ∩ A_j| / |A_i ∪ A_j| (Jaccard) of the
    important sets (:func:`important_masks`; scope ``batch`` ranks each example alone, ``corpus``
    uses the manifest thresholds). Examples without a trainable token are skipped; two empty sets
    count as agreeing (1.0); a pair is averaged over the examples where both scores are finite.
    Returns ``{"scores", "overlap", "examples", "rho", "scope"}``.
    """
    d = open_directory(shards_dir)
    scorers = d.manifest.scorer_names
    names = score_names(scorers)
    thresholds = corpus_thresholds(d.uri, rho) if scope == "corpus" else None
    lf = _scan(_shard_paths(d), scorers)
    columns = [ID, LOSS_MASK] + [score_column(name) for name in scorers]
    frame = _collect_all(d, [lf.select(columns).head(max(int(max_examples), 0))])[0]
    k = len(names)
    sums, counts = np.zeros((k, k)), np.zeros((k, k))
    used = 0
    for row in frame.iter_rows(named=True):
        row.update({SOURCE: "", INPUT_IDS: []})
        example = _example_of(row, scorers)
        if not trainable_mask(example["loss_mask"]).any():
            continue
        used += 1
        masks = important_masks(example, rho, scope, thresholds)
        sets = [np.asarray(masks[name], bool) if name in masks else None for name in names]
        for i in range(k):
            for j in range(i, k):
                if sets[i] is None or sets[j] is None:
                    continue
                union = int((sets[i] | sets[j]).sum())
                value = 1.0 if union == 0 else int((sets[i] & sets[j]).sum()) / union
                sums[i, j] += value
                counts[i, j] += 1
    overlap = [[1.0 if i == j else None for j in range(k)] for i in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            value = float(sums[i, j] / counts[i, j]) if counts[i, j] else None
            overlap[i][j] = overlap[j][i] = value
    return {"scores": names, "overlap": overlap, "examples": used, "rho": rho, "scope": scope}
