"""Per-source losses: metric-safe keys, the sums by hand, the logged window, and exactness across ranks.

The 2-rank test trains one step through train/main.py's own ``train_step`` (the stand-in engine of
tests/train/test_group_decision.py: DeepSpeed's gradient arithmetic, no optimizer step) on 4 packed
micro-batches whose examples come from 3 sources: one rank with 4 micro-batches, and two gloo ranks
with 2 each. The per-source sums summed over the ranks equal the single process's, and both equal a
plain per-token recomputation.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.train.test_group_decision import LocalEngine, free_port, make_micro_batches, make_model
from train.heldout import GROUP_SUM_NAMES, reduce_source_sums, source_summaries
from train.sources import (SOURCE_SUM_NAMES, SourceWindow, add_source_sums, describe_sources, source_keys, source_lines,
                           source_record)

N_SOURCES = 3
CASES = {"sftgo": ["loss.name=sftgo", "loss.lambda=0.9", "importance.rho=0.7"],
         "eaft_no_score": ["loss.name=eaft", "importance.scorer=none", "loss.eaft_k=5"]}


def test_source_keys_are_metric_safe_distinct_and_keep_safe_names():
    names = sorted(["Zeta é", "a b", "a/b", "a_b", "", "中文", "-x-", "a" * 60, "a_b_2", "lima"])
    assert names == ["", "-x-", "Zeta é", "a b", "a/b", "a_b", "a_b_2", "a" * 60, "lima", "中文"]
    assert source_keys(names) == [
        "source_e3b0c442",  # sha256("")[:8]: nothing safe left
        "-x-",
        "Zeta",
        "a_b_3",  # "a_b" and "a_b_2" are names of their own: they keep their keys, the cleaned-up ones come after
        "a_b_4",
        "a_b",
        "a_b_2",
        "a" * 48,
        "lima",
        "source_72726d88",  # sha256("中文")[:8]
    ]
    assert source_keys([]) == []


def test_sums_and_record_by_hand():
    # 5 trainable tokens of sources [a, b, a, b, b]; source c has none.
    token_loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0], requires_grad=True)
    source = torch.tensor([0, 1, 0, 1, 1])
    important = torch.tensor([True, False, False, True, False])
    sums = torch.zeros(N_SOURCES, len(SOURCE_SUM_NAMES), dtype=torch.float64)
    add_source_sums(sums, token_loss, source, important)
    assert sums.tolist() == [[4.0, 2.0, 1.0, 1.0], [12.0, 3.0, 4.0, 1.0], [0.0, 0.0, 0.0, 0.0]]
    add_source_sums(sums, torch.tensor([5.0]), torch.tensor([2]), torch.tensor([False]))  # a second micro-batch adds
    keys = ["a", "b", "c"]
    assert source_record(sums, keys, groups=True) == {
        "source/a/tokens": 2, "source/a/ce": 2.0, "source/a/important_loss": 1.0, "source/a/unimportant_loss": 3.0,
        "source/b/tokens": 3, "source/b/ce": 4.0, "source/b/important_loss": 4.0, "source/b/unimportant_loss": 4.0,
        "source/c/tokens": 1, "source/c/ce": 5.0, "source/c/unimportant_loss": 5.0}  # no important token: no mean of none
    assert source_record(sums, keys, groups=False, prefix="x/") == {
        "x/a/tokens": 2, "x/a/ce": 2.0, "x/b/tokens": 3, "x/b/ce": 4.0, "x/c/tokens": 1, "x/c/ce": 5.0}


def test_window_sums_steps_until_taken_then_starts_again():
    window = SourceWindow(["lima", "web/x.json"], groups=False)
    assert window.keys == ["lima", "web_x.json"]
    window.add(torch.tensor([[2.0, 1.0, 0.0, 0.0], [9.0, 3.0, 0.0, 0.0]], dtype=torch.float64).reshape(-1))
    window.add(torch.tensor([[4.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64).reshape(-1))
    record = window.take()
    assert record == {"source/lima/tokens": 4, "source/lima/ce": 1.5, "source/web_x.json/tokens": 3, "source/web_x.json/ce": 3.0}
    assert window.postfix(record) == {"ce[lima]": "1.500", "ce[web_x.json]": "3.000"}
    assert window.take() == {"source/lima/tokens": 0, "source/web_x.json/tokens": 0}
    assert SourceWindow(["one"], groups=True).postfix({"source/one/ce": 1.0}) == {}  # one source: the record's ce
    assert SourceWindow([str(i) for i in range(4)], groups=True).postfix({"source/0/ce": 1.0}) == {}  # too many for a line


def test_log_lines_and_start_up_line():
    record = {"eval_ce": 1.0, "eval_source/a/tokens": 3, "eval_source/a/ce": 0.5, "eval_source/b_c/tokens": 0}
    assert source_lines(record, "eval_source/", "final eval, source") == [
        "final eval, source a: tokens=3, ce=0.5000", "final eval, source b_c: tokens=0"]
    many = {f"eval_source/s{i}/tokens": i for i in range(12)}
    lines = source_lines(many, "eval_source/", "final eval, source", limit=10)
    assert len(lines) == 11 and lines[-1] == "final eval, source: 2 more sources in metrics.jsonl"
    assert describe_sources(["lima", "web/x"], "d") == "per-source metrics: 2 source(s) in d: lima, web_x ('web/x')"
    assert describe_sources([str(i) for i in range(65)], "d").startswith("per-source metrics: off (65 distinct")


def test_heldout_source_sums_by_hand():
    # [CE, hit] of 4 tokens of sources [1, 0, 1, 1] (source 2 absent), important [T, T, F, F].
    loss_hits = torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, 0.0], [5.0, 1.0]])
    sums = reduce_source_sums(loss_hits, torch.tensor([True, True, False, False]), torch.tensor([1, 0, 1, 1]), 3)
    assert len(GROUP_SUM_NAMES) == 9
    assert sums.tolist() == [[2.0, 1.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                             [9.0, 3.0, 1.0, 1.0, 8.0, 2.0, 2.0, 1.0, 1.0],
                             [0.0] * 9]
    assert source_summaries(sums, ["a", "b", "c"], groups=True) == [
        {"source": "a", "tokens": 1, "ce": 2.0, "accuracy": 0.0, "important_tokens": 1, "important_loss": 2.0},
        {"source": "b", "tokens": 3, "ce": 3.0, "accuracy": 2 / 3, "important_tokens": 1, "important_loss": 1.0,
         "unimportant_loss": 4.0},
        {"source": "c", "tokens": 0, "important_tokens": 0}]
    assert source_summaries(sums, ["a", "b", "c"], groups=False)[1] == {"source": "b", "tokens": 3, "ce": 3.0, "accuracy": 2 / 3}


# ---------------------------------------------------------------------------------------------
# Exact across ranks and micro-batches
# ---------------------------------------------------------------------------------------------


def with_sources(micro: list[dict]) -> list[dict]:
    """Each example's tokens tagged with its source, example k from source k % 3 (not every source in every batch)."""
    out, count = [], 0
    for batch in micro:
        tags = [torch.full((n,), (count + i) % N_SOURCES, dtype=torch.long) for i, n in enumerate(batch["seq_lens"])]
        out.append(dict(batch, source=torch.cat(tags)))
        count += len(batch["seq_lens"])
    return out


def step_source_sums(case: str, micro: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """train_step's per-source sums on this rank's ``micro``, summed over ranks; on one rank also the sums by hand."""
    from train import config as train_config
    from train.losses import build_loss
    from train.step import Batch, forward_losses, group_masks, train_step

    cfg = train_config.load_config([*CASES[case], f"train.grad_accum={len(micro)}", "importance.scope=sequence",
                                    "train.ce_chunk=16", "data.micro_batch_tokens=64", "data.train=unused"])
    train_config.validate(cfg)
    model = make_model()
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    batches = [Batch.of(dict(b, ref_loss=None)) for b in micro]
    sums = torch.zeros(N_SOURCES, len(SOURCE_SUM_NAMES), dtype=torch.float64)
    train_step(LocalEngine(model, cfg.train.grad_accum), batches, loss_fn, cfg, None, 0.0, torch.device("cpu"), source_sums=sums)
    dist.all_reduce(sums)
    if dist.get_world_size() > 1:
        return sums, None
    # By hand: every trainable token's CE (a separate forward of the same weights) into its source's row, in Python.
    by_hand = [[0.0] * len(SOURCE_SUM_NAMES) for _ in range(N_SOURCES)]
    with torch.no_grad():
        for batch, important in zip(batches, group_masks(batches, cfg, None)):
            ce = forward_losses(model, batch, cfg, torch.device("cpu"))
            for loss, source, imp in zip(ce.tolist(), batch.source[batch.loss_mask].tolist(), important[batch.loss_mask].tolist()):
                row = by_hand[source]
                row[0] += loss
                row[1] += 1
                row[2] += loss if imp else 0.0
                row[3] += 1 if imp else 0
    return sums, torch.tensor(by_hand, dtype=torch.float64)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        micro = with_sources(make_micro_batches())
        mine = micro if world == 1 else micro[2 * rank:2 * rank + 2]
        torch.save({case: step_source_sums(case, mine) for case in CASES}, Path(out_dir) / f"world{world}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def source_sums(tmp_path_factory) -> dict[int, list[dict]]:
    out_dir = tmp_path_factory.mktemp("source_sums")
    for world in (1, 2):
        mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    return {world: [torch.load(out_dir / f"world{world}_rank{r}.pt") for r in range(world)] for world in (1, 2)}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", list(CASES))
def test_per_source_sums_over_two_ranks_equal_one_rank_and_the_hand_count(source_sums, case):
    single, by_hand = source_sums[1][0][case]
    rank0, rank1 = (source_sums[2][r][case][0] for r in range(2))
    assert torch.equal(rank0, rank1)  # all-reduced: every rank logs the same numbers
    assert torch.equal(single[:, 1], by_hand[:, 1]) and torch.equal(single[:, 3], by_hand[:, 3])  # token counts: whole
    assert torch.equal(rank0[:, 1], single[:, 1]) and torch.equal(rank0[:, 3], single[:, 3])
    assert (single[:, 1] > 0).all() and single[:, 1].sum() == sum(int(b["loss_mask"].sum()) for b in make_micro_batches())
    torch.testing.assert_close(rank0, single, rtol=1e-12, atol=0.0)  # the same per-token CE, summed in another order
    torch.testing.assert_close(single, by_hand, rtol=1e-6, atol=0.0)
    if case == "eaft_no_score":  # no groups: nothing important
        assert not single[:, 3].any()
    else:
        assert (single[:, 3] > 0).all() and (single[:, 3] < single[:, 1]).all()
