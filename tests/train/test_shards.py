"""ShardStream and friends: exactly-once sharding, deterministic shuffles, exact resume, column
pruning, derived excess loss, clear refusals, and padding-free packing."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas.shard import ID, INPUT_IDS, LOSS_MASK, MANIFEST_NAME, SOURCE, Manifest, score_column, shard_name
from schemas.validate import ShardValidationError, check_directory
from tests.train.conftest import make_examples, write_annotated_dir
from train.shards import NO_SCORE, ShardStream, corpus_threshold, open_annotated, pack

SCORERS = ["tfidf", "base_loss", "ref_loss"]


def stream_of(directory: Path | str, score: str = "tfidf", **kwargs) -> ShardStream:
    return ShardStream(str(directory), open_annotated(str(directory), "x", score), score, **kwargs)


def corrupt_columns(path: Path, names: set[str]) -> None:
    """Overwrite every column chunk (pages and their headers) of the named columns with junk bytes."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        for j in range(row_group.num_columns):
            chunk = row_group.column(j)
            if chunk.path_in_schema.split(".")[0] in names:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------------
# The helper itself
# ---------------------------------------------------------------------------------------------


def test_helper_writes_a_directory_the_validator_accepts(annotated_dir):
    manifest = check_directory(annotated_dir, deep=True, tokenizer_sha256="x")
    assert manifest.totals["rows"] == 23 and len(manifest.shards) == 3
    assert {"tfidf", "base_loss", "ref_loss", "excess_loss"} <= set(manifest.score_stats)
    # Uneven layout on purpose: shards of 9, 9, 5 rows in row groups of 4 -> 3 + 3 + 2 units.
    assert [pq.ParquetFile(annotated_dir / e.path).metadata.num_row_groups for e in manifest.shards] == [3, 3, 2]


# ---------------------------------------------------------------------------------------------
# Exactly once per epoch, across ranks and workers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, rows_per_shard, row_group_size, untrainable", [
    (23, 9, 4, (4, 17)),   # 8 units of 4/4/1/4/4/1/4/1 rows: nothing divides evenly
    (5, 2, 1, ()),         # fewer examples than world_size x workers x 2: some roles get 1 or 0 per epoch
    (3, 3, 3, (1,)),       # a single unit for 4 readers
])
def test_every_example_once_per_epoch_over_ranks_and_workers(tmp_path, n, rows_per_shard, row_group_size, untrainable):
    examples = make_examples(n, SCORERS, untrainable=untrainable, seed=n)
    write_annotated_dir(tmp_path, examples, SCORERS, rows_per_shard=rows_per_shard, row_group_size=row_group_size)
    seen: Counter[tuple[int, str]] = Counter()
    skipped = 0
    for rank in range(2):
        stream = stream_of(tmp_path, rank=rank, world_size=2, epochs=2, seed=3)
        for example in stream.examples(num_workers=2):
            seen[(example["epoch"], example["id"])] += 1
        skipped += stream.skipped_no_trainable
    trainable = [ex["id"] for i, ex in enumerate(examples) if i not in untrainable]
    assert seen == Counter({(epoch, i): 1 for epoch in (0, 1) for i in trainable})
    assert skipped == 2 * len(untrainable)  # counted, once per epoch, including trailing ones


def test_ranks_split_by_example_not_by_unit(annotated_dir):
    """Ranks' shares differ by at most one example even though row groups hold 1 to 4 rows."""
    sizes = []
    for rank in range(3):
        stream = stream_of(annotated_dir, rank=rank, world_size=3, epochs=1)
        start, stop = stream._block(0, 1)
        sizes.append(stop - start)
    assert sorted(sizes) == [7, 8, 8]


def test_micro_batches_cover_every_example_once_with_workers(annotated_dir):
    ids = []
    for rank in range(2):
        stream = stream_of(annotated_dir, rank=rank, world_size=2, epochs=1)
        for batch in stream.micro_batches(max_tokens=30, num_workers=2):
            ids += batch["ids"]
    assert len(ids) == len(set(ids)) == 21  # 23 minus the 2 without trainable tokens


@pytest.mark.parametrize("world_size, workers, epochs, max_tokens", [
    (1, 0, 1, 30), (1, 0, 2, 30), (2, 0, 1, 30), (2, 2, 2, 30), (3, 0, 2, 45), (2, 0, 3, 1000),
])
def test_token_balanced_plan_is_what_iteration_packs_and_every_example_once(tmp_path, world_size, workers, epochs, max_tokens):
    """The dry pack (plan) counts exactly the micro-batches each rank yields per epoch; every trainable example
    is in exactly one rank's batches once per epoch; the trainable tokens add up; ranks hold about equal tokens."""
    examples = make_examples(23, SCORERS, untrainable=(4, 17), seed=5, max_len=40)
    write_annotated_dir(tmp_path, examples, SCORERS, rows_per_shard=9, row_group_size=4)
    plan = stream_of(tmp_path, rank=0, world_size=world_size, seed=3, balance_tokens=True).plan(max_tokens, max(1, workers), epochs)
    trainable = {ex["id"]: int(ex["loss_mask"][1:].sum()) for i, ex in enumerate(examples) if i not in (4, 17)}
    assert (plan.examples, plan.trainable_tokens, plan.skipped) == (21, sum(trainable.values()), 2)
    seen: Counter[tuple[int, str]] = Counter()
    tokens_per_epoch: Counter[int] = Counter()
    rank_tokens = []
    for rank in range(world_size):
        stream = stream_of(tmp_path, rank=rank, world_size=world_size, seed=3, epochs=epochs, balance_tokens=True)
        per_epoch: Counter[int] = Counter()
        tokens = 0
        for batch in stream.micro_batches(max_tokens, num_workers=workers):
            per_epoch[batch["epoch"]] += 1
            seen.update((batch["epoch"], i) for i in batch["ids"])
            tokens_per_epoch[batch["epoch"]] += int(batch["loss_mask"].sum())
            tokens += len(batch["input_ids"]) if batch["epoch"] == 0 else 0
        assert [per_epoch[e] for e in range(epochs)] == plan.micro_batches[rank]
        rank_tokens.append(tokens)
    assert seen == Counter({(e, i): 1 for e in range(epochs) for i in trainable})
    assert all(tokens_per_epoch[e] == plan.trainable_tokens for e in range(epochs))
    assert max(rank_tokens) - min(rank_tokens) <= 2 * 40  # balanced to within an example or two, not by count
    assert plan.steps(3) == max(-(-sum(row) // 3) for row in plan.micro_batches)


def test_ranks_are_balanced_by_tokens_not_example_counts(tmp_path):
    """Half the examples are 10x longer: an equal-count split gives one rank ~5x the other's tokens."""
    examples = make_examples(20, SCORERS, min_len=8, max_len=8, seed=1)
    for ex in examples[:10]:
        ex["input_ids"] = np.resize(ex["input_ids"], 80)
        ex["loss_mask"] = np.arange(80) >= 4
        ex["scores"] = {name: np.resize(values, 80) for name, values in ex["scores"].items()}
    write_annotated_dir(tmp_path, examples, SCORERS, rows_per_shard=20)
    tokens = []
    for rank in range(2):
        stream = stream_of(tmp_path, rank=rank, world_size=2, epochs=1, shuffle=False, balance_tokens=True)
        tokens.append(sum(len(ex["input_ids"]) for ex in stream.examples()))
    assert sum(tokens) == 880 and abs(tokens[0] - tokens[1]) <= 80


# ---------------------------------------------------------------------------------------------
# Shuffle
# ---------------------------------------------------------------------------------------------


def _ids(stream: ShardStream) -> list[str]:
    return [example["id"] for example in stream.examples()]


def test_shuffle_is_deterministic_per_seed_and_differs_per_epoch(annotated_dir):
    two_epochs = _ids(stream_of(annotated_dir, epochs=2, seed=7))
    first, second = two_epochs[:21], two_epochs[21:]
    assert sorted(first) == sorted(second)
    assert first != second, "epochs must differ in order"
    assert _ids(stream_of(annotated_dir, epochs=2, seed=7)) == two_epochs, "same seed, same order"
    assert _ids(stream_of(annotated_dir, epochs=1, seed=8)) != first, "another seed, another order"
    # Units move, and rows move within a unit (not only whole row groups).
    stream = stream_of(annotated_dir, seed=7)
    order = stream.epoch_order(0)
    assert [u[:2] for u in order] != sorted(u[:2] for u in order)
    assert any(order[i][:2] == order[i + 1][:2] and order[i][2] > order[i + 1][2] for i in range(len(order) - 1))
    unshuffled = stream_of(annotated_dir, seed=7, shuffle=False).epoch_order(5)
    assert unshuffled == sorted(unshuffled)
    # Both levels depend on the epoch: the order of units, and the order of rows inside a unit.
    assert stream._unit_order(0).tolist() != stream._unit_order(1).tolist()
    assert any(stream._row_order(0, u).tolist() != stream._row_order(1, u).tolist() for u in range(len(stream.units)))


@pytest.mark.timeout(60)
def test_endless_stream_runs_epoch_after_epoch(tmp_path):
    examples = make_examples(12, ["tfidf"], untrainable=range(6, 12))
    write_annotated_dir(tmp_path, examples, ["tfidf"], rows_per_shard=6)
    # epochs=None: the trainer decides when to stop; epoch e is still seen exactly once.
    stream = stream_of(tmp_path, seed=1)
    got = [(ex["epoch"], ex["id"]) for _, ex in zip(range(6 * 4), stream.examples())]
    assert Counter(got) == Counter({(e, f"ex-{i:05d}"): 1 for e in range(4) for i in range(6)})
    assert stream.skipped_no_trainable >= 3 * 6
    # Unshuffled, rank 1's share is exactly the six examples without a trainable token: its endless
    # stream ends (after counting them) instead of spinning forever without yielding.
    idle = stream_of(tmp_path, rank=1, world_size=2, shuffle=False)
    assert list(idle.examples()) == [] and idle.skipped_no_trainable == 6


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def _batch_ids(batches) -> list[list[str]]:
    return [batch["ids"] for batch in batches]


@pytest.mark.parametrize("k", [0, 1, 4, 7, 9])
def test_resume_in_process_continues_the_exact_micro_batch_sequence(annotated_dir, k):
    def fresh() -> ShardStream:
        return stream_of(annotated_dir, rank=1, world_size=2, epochs=2, seed=11)

    full = _batch_ids(fresh().micro_batches(max_tokens=25))
    assert len(full) > 9  # k = 9 crosses the epoch boundary
    first = fresh()
    head = []
    iterator = first.micro_batches(max_tokens=25)
    for _ in range(k):
        head.append(next(iterator)["ids"])
    state = json.loads(json.dumps(first.state_dict()))  # a checkpoint is JSON
    resumed = fresh()
    resumed.load_state_dict(state)
    assert head + _batch_ids(resumed.micro_batches(max_tokens=25)) == full
    assert resumed.skipped_no_trainable == fresh_skipped(annotated_dir)


def fresh_skipped(directory: Path) -> int:
    stream = stream_of(directory, rank=1, world_size=2, epochs=2, seed=11)
    for _ in stream.micro_batches(max_tokens=25):
        pass
    return stream.skipped_no_trainable


@pytest.mark.parametrize("k", [3, 6])
def test_resume_with_dataloader_workers_continues_the_exact_sequence(annotated_dir, k):
    def fresh() -> ShardStream:
        return stream_of(annotated_dir, rank=0, world_size=1, epochs=2, seed=5)

    full = _batch_ids(fresh().micro_batches(max_tokens=20, num_workers=2))
    first = fresh()
    iterator = first.micro_batches(max_tokens=20, num_workers=2)
    head = [next(iterator)["ids"] for _ in range(k)]
    state = first.state_dict()
    del iterator  # the interrupted run's workers go away
    resumed = fresh()
    resumed.load_state_dict(state)
    assert head + _batch_ids(resumed.micro_batches(max_tokens=20, num_workers=2)) == full
    # Same set over the two epochs, each trainable example once per epoch.
    assert Counter(i for ids in full for i in ids) == Counter({i: 2 for i in _ids(stream_of(annotated_dir, epochs=1))})


def test_resume_of_single_examples(annotated_dir):
    full = _ids(stream_of(annotated_dir, epochs=2, seed=1))
    first = stream_of(annotated_dir, epochs=2, seed=1)
    iterator = first.examples()
    head = [next(iterator)["id"] for _ in range(13)]
    resumed = stream_of(annotated_dir, epochs=2, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + _ids(resumed) == full


def test_state_refuses_another_order(annotated_dir):
    state = stream_of(annotated_dir, seed=1, world_size=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        stream_of(annotated_dir, seed=2, world_size=2, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        stream_of(annotated_dir, seed=1).load_state_dict(state)
    two_workers = stream_of(annotated_dir, epochs=1)
    next(two_workers.examples(num_workers=2))
    single = stream_of(annotated_dir, epochs=1)
    single.load_state_dict(two_workers.state_dict())
    with pytest.raises(ValueError, match="num_workers"):
        next(single.examples(num_workers=0))


# ---------------------------------------------------------------------------------------------
# Reading only what is needed
# ---------------------------------------------------------------------------------------------


def test_reads_only_the_needed_columns_row_group_by_row_group(annotated_dir, monkeypatch):
    requested: list[tuple[int, tuple[str, ...]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        requested.append((i, tuple(columns)))
        return original(self, i, columns=columns, **kwargs)

    def whole_file(*args, **kwargs):
        raise AssertionError("the stream must never read a whole file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    _ids(stream_of(annotated_dir, "tfidf", epochs=1))
    # The `source` column alone of each of the 8 units first (the directory's sources, for per-source metrics),
    # then each of the 8 units once in one epoch, one row group at a time.
    assert requested[:8] == [(i, (SOURCE,)) for _, i, _ in stream_of(annotated_dir, "tfidf").units]
    assert {cols for _, cols in requested[8:]} == {(ID, INPUT_IDS, LOSS_MASK, SOURCE, score_column("tfidf"))}
    assert len(requested) == 16
    requested.clear()
    _ids(stream_of(annotated_dir, "excess_loss", epochs=1, with_ref_loss=True))
    assert {cols for _, cols in requested[8:]} == {(ID, INPUT_IDS, LOSS_MASK, SOURCE, score_column("base_loss"),
                                                    score_column("ref_loss"))}
    # A rank reads only the units overlapping its block (here 2 of 3 ranks' worth is never touched).
    requested.clear()
    _ids(stream_of(annotated_dir, epochs=1, rank=0, world_size=3, shuffle=False))
    assert len(requested) - 8 <= 3  # 7 or 8 examples in row groups of 4: at most 3 units (after the source pass)
    # A planned stream reads the sources with the lengths (loss_mask), in the same reads: no pass of their own.
    requested.clear()
    _ids(stream_of(annotated_dir, "tfidf", epochs=1, balance_tokens=True))
    assert {cols for _, cols in requested[:8]} == {(LOSS_MASK, SOURCE)}
    assert len(requested) == 16


def test_unrelated_columns_may_be_unreadable(annotated_dir):
    """Junk in other scorers' columns does not matter: those bytes are never read."""
    for entry in Manifest.load(annotated_dir).shards:
        corrupt_columns(annotated_dir / entry.path, {score_column("base_loss"), score_column("ref_loss")})
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(annotated_dir / shard_name(0))  # the corruption is real
    clean = {ex["id"]: ex for ex in make_examples(23, SCORERS, untrainable=(4, 17))}
    got = list(stream_of(annotated_dir, "tfidf", epochs=1).examples())
    assert len(got) == 21
    for example in got:
        want = clean[example["id"]]
        assert example[INPUT_IDS].tolist() == want["input_ids"].tolist()
        assert torch.equal(example["score"], torch.from_numpy(want["scores"]["tfidf"]))


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def test_excess_loss_is_base_minus_ref_and_ref_loss_travels(annotated_dir):
    clean = {ex["id"]: ex for ex in make_examples(23, SCORERS, untrainable=(4, 17))}
    for batch in stream_of(annotated_dir, "excess_loss", epochs=1, with_ref_loss=True).micro_batches(max_tokens=40):
        base = np.concatenate([clean[i]["scores"]["base_loss"] for i in batch["ids"]])
        ref = np.concatenate([clean[i]["scores"]["ref_loss"] for i in batch["ids"]])
        assert batch["score"].dtype == torch.float32
        assert torch.equal(batch["score"], torch.from_numpy(base - ref))
        assert torch.equal(batch["ref_loss"], torch.from_numpy(ref))
    batch = next(stream_of(annotated_dir, "tfidf", epochs=1).micro_batches(max_tokens=40))
    assert batch["ref_loss"] is None


def test_no_score_reads_no_score_column_and_scores_zero(annotated_dir, monkeypatch):
    """importance.scorer=none (a loss that reads no score): no score column is read, every score is 0, and a
    directory without any scorer opens."""
    requested: list[tuple[str, ...]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kwargs):
        requested.append(tuple(columns))
        return original(self, i, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    batches = list(stream_of(annotated_dir, NO_SCORE, epochs=1).micro_batches(max_tokens=40))
    assert {cols for cols in requested} == {(SOURCE,), (ID, INPUT_IDS, LOSS_MASK, SOURCE)}  # (SOURCE,): the sources pass
    assert sum(len(b["ids"]) for b in batches) == 21 and all(not b["score"].any() for b in batches)
    bare = annotated_dir.parent / "no_scores"
    write_annotated_dir(bare, make_examples(5, []), [])
    assert len(list(stream_of(bare, NO_SCORE, epochs=1).examples())) == 5
    with pytest.raises(ValueError, match="score 'tfidf'"):
        open_annotated(str(bare), "x", "tfidf")


def test_corpus_threshold_reads_the_manifest_quantiles(annotated_dir):
    manifest = Manifest.load(annotated_dir)
    examples = make_examples(23, SCORERS, untrainable=(4, 17))
    for score in ("tfidf", "excess_loss"):
        if score == "excess_loss":
            values = np.concatenate([(e["scores"]["base_loss"].astype(np.float64) - e["scores"]["ref_loss"])[e["loss_mask"]] for e in examples])
        else:
            values = np.concatenate([e["scores"][score][e["loss_mask"]] for e in examples])
        for rho in (0.0, 0.3, 0.7, 0.9):
            # Merged per-shard sketches: within a few ranks of the exact quantile.
            got = corpus_threshold(manifest, score, rho)
            rank = (values < got).mean()
            assert abs(rank - rho) < 0.05, (score, rho, got, rank)
    with pytest.raises(ValueError, match="rho"):
        corpus_threshold(manifest, "tfidf", 1.0)
    with pytest.raises(ValueError, match="score_stats"):
        corpus_threshold(manifest, "llmlingua2", 0.5)


# ---------------------------------------------------------------------------------------------
# Refusals, each naming the file or option at fault
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_tokenizer_mismatch_is_refused(annotated_dir, scheme):
    with pytest.raises(ShardValidationError) as err:
        open_annotated(f"{scheme}{annotated_dir}", "another-sha", "tfidf")
    assert f"{annotated_dir}/{MANIFEST_NAME}" in str(err.value) and "tokenizer fingerprint" in str(err.value)


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_missing_score_is_refused(tmp_path, scheme):
    write_annotated_dir(tmp_path, make_examples(4, ["tfidf", "base_loss"]), ["tfidf", "base_loss"])
    with pytest.raises(ValueError) as err:
        open_annotated(f"{scheme}{tmp_path}", "x", "llmlingua2")
    message = str(err.value)
    assert f"{tmp_path}/{MANIFEST_NAME}" in message and "'llmlingua2' (importance.scorer)" in message  # the option's own key
    with pytest.raises(ValueError, match=r"'llmlingua2' \(--scorer\)"):  # as evaluation.run names it
        open_annotated(f"{scheme}{tmp_path}", "x", "llmlingua2", option="--scorer")
    assert "['tfidf', 'base_loss']" in message  # what it does offer
    with pytest.raises(ValueError, match="needs both base_loss and ref_loss"):
        open_annotated(f"{scheme}{tmp_path}", "x", "excess_loss")
    with pytest.raises(ValueError, match="name the scorer, not its column"):
        open_annotated(f"{scheme}{tmp_path}", "x", "score_tfidf")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_nan_scores_are_refused(tmp_path, scheme):
    examples = make_examples(10, ["tfidf"])
    examples[6]["scores"]["tfidf"][2] = np.nan
    write_annotated_dir(tmp_path, examples, ["tfidf"], rows_per_shard=4)
    bad = f"{tmp_path}/{shard_name(1)}"
    with pytest.raises(ShardValidationError, match=re.escape(f"{bad}: row 2: score_tfidf holds NaN")):
        open_annotated(f"{scheme}{tmp_path}", "x", "tfidf", deep=True)
    # The quick check reads footers only; the stream still refuses the NaN when it meets it.
    manifest = open_annotated(f"{scheme}{tmp_path}", "x", "tfidf")
    stream = ShardStream(f"{scheme}{tmp_path}", manifest, "tfidf", epochs=1)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: row group 0, row 2 (id ex-00006): tfidf holds NaN")):
        list(stream.examples())


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_corrupt_parquet_is_refused(tmp_path, scheme):
    write_annotated_dir(tmp_path, make_examples(10, ["tfidf"]), ["tfidf"], rows_per_shard=4)
    (tmp_path / shard_name(1)).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ShardValidationError, match=re.escape(f"{tmp_path}/{shard_name(1)}: not a readable Parquet file")):
        open_annotated(f"{scheme}{tmp_path}", "x", "tfidf")


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_empty_dataset_is_refused(tmp_path, scheme):
    empty = tmp_path / "empty"
    write_annotated_dir(empty, [], ["tfidf"])
    with pytest.raises(ValueError, match=re.escape(f"{empty}/{MANIFEST_NAME}: empty dataset")):
        open_annotated(f"{scheme}{empty}", "x", "tfidf")
    # A manifest listing no shard at all.
    manifest = Manifest.load(empty)
    manifest.shards = []
    manifest.save(empty)
    (empty / shard_name(0)).unlink()
    with pytest.raises(ShardValidationError, match=re.escape(f"{empty}/{MANIFEST_NAME}: lists no shards")):
        open_annotated(f"{scheme}{empty}", "x", "tfidf")
    # Rows, but not one trainable token.
    dead = tmp_path / "dead"
    write_annotated_dir(dead, make_examples(3, ["tfidf"], untrainable=range(3)), ["tfidf"])
    with pytest.raises(ValueError, match=re.escape(f"{dead}/{MANIFEST_NAME}: 3 rows but no trainable token")):
        open_annotated(f"{scheme}{dead}", "x", "tfidf")


def test_unfinished_directory_is_refused(tmp_path):
    write_annotated_dir(tmp_path, make_examples(3, ["tfidf"]), ["tfidf"])
    (tmp_path / MANIFEST_NAME).unlink()
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        with pytest.raises(ShardValidationError, match=re.escape(f"{tmp_path}/{MANIFEST_NAME}: missing")):
            open_annotated(uri, "x", "tfidf")


def test_file_uri_reads_the_same_as_a_path(annotated_dir):
    uri = f"file://{annotated_dir}"
    manifest = open_annotated(uri, "x", "tfidf", deep=True)
    via_uri = [b["ids"] for b in ShardStream(uri, manifest, "tfidf", epochs=1, seed=4).micro_batches(max_tokens=30)]
    via_path = [b["ids"] for b in stream_of(annotated_dir, epochs=1, seed=4).micro_batches(max_tokens=30)]
    assert via_uri == via_path and len(via_uri) > 1


def test_remote_filesystem_reads_through_fsspec(annotated_dir):
    """memory:// stands in for s3:// or gs://: no local path exists, every byte goes through fsspec."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/sftgo-test-{annotated_dir.parent.name}"
    for path in annotated_dir.iterdir():
        fs.pipe(f"{root}/{path.name}", path.read_bytes())
    uri = f"memory://{root}"
    try:
        manifest = open_annotated(uri, "x", "excess_loss", deep=True)
        remote = ShardStream(uri, manifest, "excess_loss", epochs=1, seed=4, with_ref_loss=True)
        got = [(b["ids"], b["score"], b["ref_loss"]) for b in remote.micro_batches(max_tokens=30)]
        want = [(b["ids"], b["score"], b["ref_loss"])
                for b in stream_of(annotated_dir, "excess_loss", epochs=1, seed=4, with_ref_loss=True).micro_batches(max_tokens=30)]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert all(torch.equal(g[1], w[1]) and torch.equal(g[2], w[2]) for g, w in zip(got, want))
        with pytest.raises(ShardValidationError, match=re.escape(f"{uri}/{MANIFEST_NAME}: tokenizer fingerprint")):
            open_annotated(uri, "another-sha", "tfidf")
        fs.pipe(f"{root}/{shard_name(2)}", b"junk")
        with pytest.raises(ShardValidationError, match=re.escape(f"{uri}/{shard_name(2)}: not a readable Parquet file")):
            open_annotated(uri, "x", "tfidf")
    finally:
        fs.rm(root, recursive=True)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_pack_respects_the_budget_and_keeps_order():
    def example(name: str, n: int) -> dict:
        return {"id": name, "input_ids": np.arange(n), "loss_mask": np.ones(n, bool), "score": np.zeros(n, np.float32)}

    lengths = [3, 4, 2, 12, 5, 5, 1, 10]
    batches = list(pack([example(str(i), n) for i, n in enumerate(lengths)], max_tokens=10))
    assert [b["seq_lens"] for b in batches] == [[3, 4, 2], [12], [5, 5], [1], [10]]
    assert [b["ids"] for b in batches] == [["0", "1", "2"], ["3"], ["4", "5"], ["6"], ["7"]]
    for b in batches:  # over budget only when one example alone is longer than it
        assert len(b["input_ids"]) <= 10 or len(b["seq_lens"]) == 1
        assert b["ref_loss"] is None
        assert b["source"] is None  # examples that name no source
    with pytest.raises(ValueError):
        next(pack([], 0))


def test_sources_are_the_directory_values_sorted_and_travel_per_token_through_packing(tmp_path):
    """Every rank (and a resumed run) sees the same sorted list of the `source` column's values; each packed token
    carries its example's index in it, through DataLoader workers too."""
    names = ["web/b.jsonl", "alpha", "Zeta é"]
    examples = make_examples(14, ["tfidf"], seed=2)
    for i, ex in enumerate(examples):
        ex["source"] = names[i % 3]
    write_annotated_dir(tmp_path, examples, ["tfidf"], rows_per_shard=5, row_group_size=2)
    by_id = {ex["id"]: ex for ex in examples}
    want_sources = ["Zeta é", "alpha", "web/b.jsonl"]  # sorted by code point, whatever the row order
    for rank, world_size in ((0, 1), (1, 2)):
        assert stream_of(tmp_path, rank=rank, world_size=world_size, seed=rank).read_sources() == want_sources
    for workers in (0, 2):
        stream = stream_of(tmp_path, epochs=1, seed=3)
        seen = 0
        for batch in stream.micro_batches(max_tokens=30, num_workers=workers):
            want = [want_sources.index(by_id[i]["source"]) for i, n in zip(batch["ids"], batch["seq_lens"]) for _ in range(n)]
            assert batch["source"].dtype == torch.long and batch["source"].tolist() == want
            seen += len(batch["ids"])
        assert seen == 14 and stream.sources == want_sources
    example = next(iter(stream_of(tmp_path, shuffle=False, epochs=1)))
    assert example["source"] == want_sources.index(by_id[example["id"]]["source"])


def test_a_source_added_after_the_stream_opened_is_refused_naming_the_row(tmp_path):
    examples = make_examples(6, ["tfidf"], seed=4)
    write_annotated_dir(tmp_path, examples, ["tfidf"], rows_per_shard=6)
    stream = stream_of(tmp_path, shuffle=False, epochs=1)
    assert stream.read_sources() == ["test"]
    stream.sources = ["other"]  # as if the shards had been rewritten since
    with pytest.raises(ValueError, match=r"shard-00000\.parquet: row group 0, row 0 \(id ex-00000\): source 'test' was not"):
        list(stream)


def test_micro_batches_restart_positions_and_carry_masks_with_tokens(tmp_path):
    # Scores equal token ids and the mask marks even token ids: any misalignment shows.
    examples = make_examples(30, ["tfidf"], min_len=2, max_len=40, seed=9)
    for ex in examples:
        ex["input_ids"][1] -= ex["input_ids"][1] % 2  # an even id at position 1: every example trainable
        ex["scores"]["tfidf"] = ex["input_ids"].astype(np.float32)
        ex["loss_mask"] = ex["input_ids"] % 2 == 0
    write_annotated_dir(tmp_path, examples, ["tfidf"], rows_per_shard=7, row_group_size=3)
    by_id = {ex["id"]: ex for ex in examples}
    seen = []
    for batch in stream_of(tmp_path, epochs=1, seed=2).micro_batches(max_tokens=64):
        ids, pos, mask = batch["input_ids"], batch["position_ids"], batch["loss_mask"]
        assert ids.dtype == pos.dtype == torch.long and mask.dtype == torch.bool and batch["score"].dtype == torch.float32
        assert len(ids) == len(pos) == len(mask) == len(batch["score"]) == sum(batch["seq_lens"])
        assert len(ids) <= 64 or len(batch["seq_lens"]) == 1
        assert torch.equal(batch["score"], ids.float())
        # Position 0 of every example predicts nothing: never trainable, whatever the shard says.
        assert torch.equal(mask, (ids % 2 == 0) & (pos > 0))
        starts = np.cumsum([0] + batch["seq_lens"][:-1])
        assert pos[starts].tolist() == [0] * len(starts)
        assert torch.equal(pos, torch.cat([torch.arange(n) for n in batch["seq_lens"]]))
        for i, start, n in zip(batch["ids"], starts, batch["seq_lens"]):
            assert ids[start:start + n].tolist() == by_id[i]["input_ids"].tolist()
        seen += batch["ids"]
    assert sorted(seen) == sorted(by_id)
