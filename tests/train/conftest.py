"""Train-test helpers: small, valid annotated directories written directly, without annotate.

    from tests.train.conftest import make_examples, write_annotated_dir
    write_annotated_dir(tmp_path, make_examples(20, scorers=["tfidf"]), ["tfidf"], rows_per_shard=8)

The files follow schemas.shard exactly (columns from arrow_schema, ShardMetadata in the footer,
quantile summaries from summarize_scores / merge_summaries, the manifest written last), so
``schemas.validate.check_directory(dir, deep=True)`` accepts them unless a test breaks them on purpose.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.shard import (
    EXCESS_LOSS,
    EXCESS_LOSS_PARTS,
    ID,
    INPUT_IDS,
    LOSS_MASK,
    SCHEMA_VERSION,
    SOURCE,
    Manifest,
    ScorerInfo,
    ShardEntry,
    ShardMetadata,
    arrow_schema,
    file_sha256,
    merge_summaries,
    score_column,
    shard_name,
    summarize_scores,
)

TOKENIZER_FP = {"name": "t", "sha256": "x"}


def make_examples(
    n: int,
    scorers: Iterable[str] = ("tfidf",),
    *,
    seed: int = 0,
    min_len: int = 3,
    max_len: int = 20,
    untrainable: Iterable[int] = (),
    prefix: str = "ex",
) -> list[dict[str, Any]]:
    """``n`` random examples: a prompt (not trainable) then a response (trainable), random scores.

    Ids are ``f"{prefix}-{i:05d}"``; examples whose index is in ``untrainable`` have an all-false
    loss mask. Loss-like scorers (base_loss, ref_loss) get non-negative values.
    """
    if min_len < 2:
        raise ValueError("min_len must be >= 2 (position 0 is never trainable)")
    rng = np.random.default_rng(seed)
    skip = set(untrainable)
    examples = []
    for i in range(n):
        length = int(rng.integers(min_len, max_len + 1))
        prompt = int(rng.integers(1, length))  # at least one token of prompt and one of response
        loss_mask = np.arange(length) >= prompt
        if i in skip:
            loss_mask[:] = False
        examples.append({
            "id": f"{prefix}-{i:05d}",
            "input_ids": rng.integers(0, 1000, length).astype(np.int32),
            "loss_mask": loss_mask,
            "scores": {name: (rng.random(length) * 5).astype(np.float32) for name in scorers},
        })
    return examples


def _scores_of(example: dict[str, Any], name: str, index: int) -> np.ndarray:
    scores = example.get("scores", {})
    if name in scores:
        return np.asarray(scores[name], dtype=np.float32)
    # Not given: deterministic values, so tests that do not care about this scorer need not make them.
    return np.random.default_rng([index, len(name)]).random(len(example["input_ids"])).astype(np.float32)


def _score_stats(chunk: list[dict[str, Any]], scorers: list[str], first: int) -> dict[str, dict[str, Any]]:
    """Per-scorer summaries of trainable-token scores (and excess_loss when derivable), as annotate does."""

    def trainable(name: str) -> np.ndarray:
        parts = [_scores_of(ex, name, first + i)[np.asarray(ex["loss_mask"], bool)] for i, ex in enumerate(chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    stats = {name: summarize_scores(trainable(name)) for name in scorers}
    if all(part in scorers for part in EXCESS_LOSS_PARTS):
        base, ref = (trainable(p).astype(np.float64) for p in EXCESS_LOSS_PARTS)
        stats[EXCESS_LOSS] = summarize_scores(base - ref)
    return stats


def write_annotated_dir(
    path: str | Path,
    examples: Sequence[dict[str, Any]],
    scorers: Iterable[str],
    tokenizer_fp: dict[str, str] | None = None,
    rows_per_shard: int = 16,
    row_group_size: int | None = None,
    schema_version: int = SCHEMA_VERSION,
) -> Manifest:
    """Write ``examples`` as valid shards plus ``_manifest.json`` into ``path``; return the manifest.

    ``schema_version=1`` writes a directory as schema v1 did (footers say 1, ``manifest.json``).

    Each example: ``input_ids``, ``loss_mask`` and optionally ``id`` (default ``ex-<index>``),
    ``source`` (default ``"test"``) and ``scores`` {scorer name: per-token values} (missing scorers
    get deterministic random values). ``tokenizer_fp`` defaults to ``{"name": "t", "sha256": "x"}``.
    ``row_group_size`` (default: one row group per shard) sets Parquet row groups within a shard.
    No examples: one shard with zero rows (an empty dataset, for tests of that refusal).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scorers = list(scorers)
    fingerprint = dict(tokenizer_fp or TOKENIZER_FP)
    infos = [ScorerInfo(name=name) for name in scorers]
    chunks = [list(examples[i:i + rows_per_shard]) for i in range(0, len(examples), rows_per_shard)] or [[]]
    entries: list[ShardEntry] = []
    stats_parts: dict[str, list[dict[str, Any]]] = {}
    first = 0
    for index, chunk in enumerate(chunks):
        meta = ShardMetadata(schema_version=schema_version, tokenizer=fingerprint, scorers=infos, shard_index=index,
                             plan={"test": True}, score_stats=_score_stats(chunk, scorers, first))
        schema = arrow_schema(scorers, meta)
        columns = {
            ID: pa.array([str(ex.get("id", f"ex-{first + i:05d}")) for i, ex in enumerate(chunk)], pa.string()),
            SOURCE: pa.array([str(ex.get("source", "test")) for ex in chunk], pa.string()),
            INPUT_IDS: pa.array([np.asarray(ex["input_ids"], np.int32) for ex in chunk], pa.list_(pa.int32())),
            LOSS_MASK: pa.array([np.asarray(ex["loss_mask"], bool) for ex in chunk], pa.list_(pa.bool_())),
        }
        for name in scorers:
            columns[score_column(name)] = pa.array([_scores_of(ex, name, first + i) for i, ex in enumerate(chunk)],
                                                   pa.list_(pa.float32()))
        table = pa.Table.from_arrays([columns[c] for c in schema.names], schema=schema)
        shard = path / shard_name(index)
        pq.write_table(table, shard, row_group_size=row_group_size or max(len(chunk), 1))
        tokens = sum(len(ex["input_ids"]) for ex in chunk)
        trainable = sum(int(np.asarray(ex["loss_mask"], bool).sum()) for ex in chunk)
        entries.append(ShardEntry(shard.name, len(chunk), tokens, trainable, file_sha256(shard)))
        for name, summary in meta.score_stats.items():
            stats_parts.setdefault(name, []).append(summary)
        first += len(chunk)
    manifest = Manifest(
        schema_version=schema_version, tokenizer=fingerprint, scorers=infos, shards=entries,
        totals={"rows": sum(e.rows for e in entries), "tokens": sum(e.tokens for e in entries),
                "trainable_tokens": sum(e.trainable_tokens for e in entries), "shards": len(entries)},
        rejected={}, score_stats={name: merge_summaries(parts) for name, parts in stats_parts.items()},
        config={"test": True},
    )
    if schema_version == 1:
        (path / "manifest.json").write_text(manifest.to_json() + "\n")
    else:
        manifest.save(path)  # last, as annotate does
    return manifest


@pytest.fixture
def annotated_dir(tmp_path) -> Path:
    """23 examples (2 without trainable tokens) over 3 shards of uneven row groups; scorers tfidf,
    base_loss, ref_loss."""
    out = tmp_path / "annotated"
    examples = make_examples(23, ["tfidf", "base_loss", "ref_loss"], untrainable=(4, 17))
    write_annotated_dir(out, examples, ["tfidf", "base_loss", "ref_loss"], rows_per_shard=9, row_group_size=4)
    return out


def implied_loss_config() -> type:
    """The ``loss`` section the registered losses imply: ``name`` and ``group_decision`` plus every registered
    loss's Options fields, keyed as in YAML, in registration order: what train/config.py's written
    :class:`LossConfig` is checked against (tests/train/test_config.py), and a new loss's keys in a test."""
    import dataclasses
    import typing

    from train.config import LossConfig, _loss_attribute, loss_option
    from train.losses import LOSSES
    from data.config import option

    fields: list[tuple[str, Any, Any]] = [(f.name, str, option(f.default, f.metadata["help"]))
                                          for f in dataclasses.fields(LossConfig)[:2]]
    for loss_cls in LOSSES.values():
        hints = typing.get_type_hints(loss_cls.Options)
        for f in dataclasses.fields(loss_cls.Options):
            key, attribute = f.metadata.get("key", f.name), _loss_attribute(f)
            if any(existing == attribute for existing, _, _ in fields):
                raise TypeError(f"loss option key {key!r} of {loss_cls.name} is already taken; give it its own key")
            fields.append((attribute, hints[f.name], loss_option(loss_cls.Options, f.name)))
    return dataclasses.make_dataclass("LossConfig", fields)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a test's process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_ranks(script: Path, args: Sequence[str], ranks: int, cwd: Path, timeout: float) -> None:
    """Run ``python script *args`` on ``ranks`` CPU ranks with the launcher's environment set by hand (gloo); each
    rank's output goes to ``cwd/rank{r}.log``, whose tail a failing rank's assertion shows. A rank still running
    at the end (a hang: TimeoutExpired) is killed, and DeepSpeed's shared-memory buffers are removed."""
    repo = Path(__file__).resolve().parents[2]
    port, procs = str(free_port()), []
    try:
        for rank in range(ranks):
            env = dict(os.environ, DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                       LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
            procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=cwd,
                                          stdout=open(cwd / f"rank{rank}.log", "w"), stderr=subprocess.STDOUT))
        for rank, proc in enumerate(procs):
            assert proc.wait(timeout=timeout) == 0, (cwd / f"rank{rank}.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
            try:
                path.unlink()
            except OSError:
                pass
