"""Grouping rules (data/grouping.py, train/grouping.py) against hand-computed masks: counts, ties,
scopes, packing, edge values of rho, the tie keys, the corpus cut, the collectives' devices."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.grouping import (
    CorpusCut,
    corpus_cut,
    id_hash,
    important_mask_packed,
    important_mask_sequence,
    position_keys,
    tie_keys,
    top_mask,
)
from schemas.shard import summarize_scores
from train.grouping import batch_important_masks, distributed_top_mask, step_important_masks

T, F = True, False
ID_HASH_EX_00001 = 17410382580189481115
KEYS_EX_00001 = [0.6366314590022726, 0.41070991496812925, 0.0054410030468292625]


def mask(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_sequence_top_half_of_trainable_tokens():
    # Position 0 is not trainable and has the highest score: it must never be important.
    scores = torch.tensor([10.0, 0.5, 0.3, 0.9, 0.2])
    loss_mask = mask(F, T, T, T, T)
    # n = 4 trainable, rho = 0.5 -> ceil(0.5 * 4) = 2 important: 0.9 (pos 3) and 0.5 (pos 1).
    assert important_mask_sequence(scores, loss_mask, 0.5).tolist() == [F, T, F, T, F]


def smallest_key(example_id, positions):
    """The position (of ``positions``) whose tie key is the smallest: the one that wins a tie."""
    keys = position_keys(example_id, np.arange(max(positions) + 1))
    return min(positions, key=lambda p: keys[p])


def test_sequence_ties_are_broken_by_the_tie_keys_not_by_position():
    # A tie straddling the cut: rho = 0.6 -> ceil(0.4 * 5) = 2 places; 0.9 takes one, and the 0.7s
    # at positions 1, 2, 4 compete for the other: the smallest tie key of (id, position) wins.
    scores = torch.tensor([0.9, 0.7, 0.7, 0.1, 0.7])
    for example_id in ("ex-a", "ex-b", "ex-c", "ex-d"):
        winner = smallest_key(example_id, [1, 2, 4])
        expected = [p in (0, winner) for p in range(5)]
        assert important_mask_sequence(scores, mask(T, T, T, T, T), 0.6, example_id).tolist() == expected
        # A non-trainable tied token takes no part: position 1 masked, the winner of {2, 4}.
        winner = smallest_key(example_id, [2, 4])
        expected = [p in (0, winner) for p in range(5)]
        assert important_mask_sequence(scores, mask(T, F, T, T, T), 0.5, example_id).tolist() == expected
    # Different ids pick different winners (the tie is not decided by position alone).
    winners = {smallest_key(f"ex-{i}", [1, 2, 4]) for i in range(20)}
    assert winners == {1, 2, 4}


def test_tie_keys_are_stable_numbers_across_processes():
    # Pinned values: BLAKE2b-64 of the id, splitmix64 mix with the position. A change here changes
    # every run's groups; Python's salted hash() would differ from process to process.
    assert id_hash("ex-00001") == ID_HASH_EX_00001
    assert position_keys("ex-00001", [0, 1, 2]).tolist() == KEYS_EX_00001
    code = ("from data.grouping import id_hash, position_keys; "
            "print(id_hash('ex-00001'), repr(position_keys('ex-00001', [0, 1, 2]).tolist()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.split(" ", 1)
    assert int(out[0]) == ID_HASH_EX_00001 and eval(out[1]) == KEYS_EX_00001
    keys = position_keys("ex-00001", np.arange(10_000))
    assert keys.min() >= 0.0 and keys.max() < 1.0 and abs(keys.mean() - 0.5) < 0.01


def test_constant_score_spreads_the_important_tokens_over_the_response():
    rho = 0.7
    lengths = [40, 17, 1, 64, 9]
    ids = [f"ex-{i:05d}" for i in range(len(lengths))]
    scores = torch.zeros(sum(lengths))  # a constant score: every trainable token is tied
    loss_mask = torch.ones(sum(lengths), dtype=torch.bool)
    starts = np.cumsum([0] + lengths[:-1])
    for start in starts:
        loss_mask[start] = False  # position 0 predicts nothing
    important = important_mask_packed(scores, loss_mask, lengths, rho, "sequence", ids=ids)
    again = important_mask_packed(scores.clone(), loss_mask.clone(), lengths, rho, "sequence", ids=list(ids))
    assert torch.equal(important, again)  # deterministic across calls
    spread = []
    for start, length in zip(starts, lengths):
        part, trainable = important[start : start + length], loss_mask[start : start + length]
        n = int(trainable.sum())
        k = math.ceil((1 - rho) * n - 1e-9)
        assert int(part.sum()) == k  # exactly ceil((1 - rho) * n) per example
        assert not (part & ~trainable).any()
        positions = torch.nonzero(part).reshape(-1).tolist()
        if n >= 9:
            assert positions != list(range(1, k + 1))  # not the first trainable tokens
            spread.append(max(positions) / length)
    assert min(spread) > 0.5  # important tokens reach the second half of every longer response
    # The same example packed elsewhere (after another one) gets the same tokens: keys follow the id.
    alone = important_mask_packed(scores[starts[3] : starts[3] + 64], loss_mask[starts[3] : starts[3] + 64], [64], rho,
                                  "sequence", ids=[ids[3]])
    assert torch.equal(alone, important[starts[3] : starts[3] + 64])


def test_rho_zero_makes_every_trainable_token_important():
    scores = torch.tensor([3.0, -1.0, 2.0, float("-inf"), 0.0])
    loss_mask = mask(T, T, F, T, T)
    assert important_mask_sequence(scores, loss_mask, 0.0).tolist() == [T, T, F, T, T]


def test_rho_close_to_one_keeps_one_token():
    scores = torch.tensor([0.2, 0.8, 0.5, 0.8])
    # ceil(0.01 * 4) = 1: the one of the two 0.8s with the smaller tie key.
    winner = smallest_key("x", [1, 3])
    assert important_mask_sequence(scores, mask(T, T, T, T), 0.99, "x").tolist() == [p == winner for p in range(4)]


def test_count_is_robust_to_float_error():
    # (1 - 0.7) * 10 = 3.0000000000000004 in floats; the count must be 3, not 4.
    scores = torch.arange(10, dtype=torch.float32)
    important = important_mask_sequence(scores, torch.ones(10, dtype=torch.bool), 0.7)
    assert important.tolist() == [F] * 7 + [T] * 3


def test_no_trainable_tokens_gives_empty_group():
    scores = torch.tensor([0.1, 0.2, 0.3])
    assert important_mask_sequence(scores, mask(F, F, F), 0.3).tolist() == [F, F, F]


def test_nan_outside_the_loss_mask_is_ignored_and_inside_raises():
    scores = torch.tensor([float("nan"), 0.2, 0.1])
    assert important_mask_sequence(scores, mask(F, T, T), 0.5).tolist() == [F, T, F]
    with pytest.raises(ValueError, match="NaN"):
        important_mask_sequence(scores, mask(T, T, T), 0.5)


@pytest.mark.parametrize("rho", [-0.1, 1.0, 1.5])
def test_rho_out_of_range_raises(rho):
    with pytest.raises(ValueError, match="rho"):
        important_mask_sequence(torch.zeros(2), mask(T, T), rho)


def test_packed_sequence_scope_ranks_each_example_alone():
    # Example A = positions 0-3 (prompt at 0), example B = positions 4-8, padding at 9.
    scores = torch.tensor([9.0, 0.1, 0.4, 0.3, 9.0, 9.0, 0.9, 0.8, 0.7, 5.0])
    loss_mask = mask(F, T, T, T, F, F, T, T, T, T)
    # rho = 0.5: A has 3 trainable -> ceil(1.5) = 2: 0.4 (pos 2), 0.3 (pos 3).
    #            B has 3 trainable -> 2: 0.9 (pos 6), 0.8 (pos 7). Position 9 is padding.
    important = important_mask_packed(scores, loss_mask, [4, 5], 0.5, "sequence")
    assert important.tolist() == [F, F, T, T, F, F, T, T, F, F]
    # A batch-wide ranking of the same tokens differs: 3 of 6 -> 0.9, 0.8, 0.7.
    important = important_mask_packed(scores, loss_mask, [4, 5], 0.5, "batch")
    assert important.tolist() == [F, F, F, F, F, F, T, T, T, F]


def test_packed_accepts_a_leading_batch_dimension_and_tensor_lengths():
    scores = torch.tensor([[0.1, 0.4, 0.3, 0.9]])
    loss_mask = torch.ones(1, 4, dtype=torch.bool)
    important = important_mask_packed(scores, loss_mask, torch.tensor([2, 2]), 0.5, "sequence")
    assert important.shape == (1, 4)
    assert important.tolist() == [[F, T, F, T]]


def test_packed_corpus_scope_uses_score_at_least_threshold():
    scores = torch.tensor([0.9, 0.2, 0.5, 0.5, 0.7, 0.1])
    loss_mask = mask(F, T, T, T, T, T)
    # threshold 0.5: important iff score >= 0.5 among trainable -> positions 2, 3 (tied at 0.5), 4.
    important = important_mask_packed(scores, loss_mask, [3, 3], 0.5, "corpus", threshold=0.5)
    assert important.tolist() == [F, F, T, T, T, F]
    # rho = 0 pairs with the minimum as threshold: every trainable token is important.
    important = important_mask_packed(scores, loss_mask, [3, 3], 0.0, "corpus", threshold=0.1)
    assert important.tolist() == [F, T, T, T, T, T]
    with pytest.raises(ValueError, match="threshold"):
        important_mask_packed(scores, loss_mask, [3, 3], 0.5, "corpus")


def test_packed_rejects_bad_scope_and_lengths():
    scores, loss_mask = torch.zeros(4), torch.ones(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="scope"):
        important_mask_packed(scores, loss_mask, [4], 0.5, "global")
    with pytest.raises(ValueError, match="seq_lens"):
        important_mask_packed(scores, loss_mask, [3, 3], 0.5, "sequence")


def test_batch_masks_rank_across_micro_batches_single_process():
    scores_list = [torch.tensor([0.5, 0.9, 0.1]), torch.tensor([0.9, 0.3, 0.8, 0.0])]
    loss_masks = [mask(T, T, T), mask(T, F, T, T)]
    # 6 trainable, rho = 0.5 -> 3 important: 0.9 (mb 0 pos 1) and 0.9 (mb 1 pos 0) tie (both in),
    # then 0.8 (mb 1 pos 2). 0.5 is out.
    masks = batch_important_masks(scores_list, loss_masks, 0.5)
    assert [m.tolist() for m in masks] == [[F, T, F], [T, F, T, F]]
    # Ties across micro-batches: the smaller tie key of (id, position) wins the last place, whichever
    # micro-batch comes first. ceil(0.4 * 4) = 2: 2.0, then one of the two 1.0s.
    scores_list, loss_masks = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])], [mask(T, T), mask(T, T)]
    first_wins = position_keys("a", [0])[0] < position_keys("b", [0])[0]
    expected = [[first_wins, T], [not first_wins, F]]
    masks = batch_important_masks(scores_list, loss_masks, 0.6, ids_list=[["a"], ["b"]], seq_lens_list=[[2], [2]])
    assert [m.tolist() for m in masks] == expected
    swapped = batch_important_masks(scores_list[::-1], loss_masks[::-1], 0.6, ids_list=[["b"], ["a"]], seq_lens_list=[[2], [2]])
    assert [m.tolist() for m in swapped] == expected[::-1]


def test_batch_masks_equal_sequence_rule_on_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    scores_list = [torch.randint(0, 4, (n,), generator=generator).float() for n in (5, 7, 3)]
    loss_masks = [torch.rand(n, generator=generator) > 0.3 for n in (5, 7, 3)]
    ids_list = [[f"m{i}"] for i in range(3)]
    masks = batch_important_masks(scores_list, loss_masks, 0.7, ids_list=ids_list, seq_lens_list=[[n] for n in (5, 7, 3)])
    keys = torch.cat([tie_keys(ids, [n]) for ids, n in zip(ids_list, (5, 7, 3))])
    expected = important_mask_sequence(torch.cat(scores_list), torch.cat(loss_masks), 0.7, keys=keys)
    assert torch.equal(torch.cat(masks), expected)
    # The step helper (what the trainer calls) gives the same masks from the micro-batch dicts.
    step = [SimpleNamespace(score=s, loss_mask=m, seq_lens=[len(s)], ids=i) for s, m, i in zip(scores_list, loss_masks, ids_list)]
    assert all(torch.equal(a, b) for a, b in zip(step_important_masks(step, 0.7, "batch"), masks))


def test_top_mask_and_distributed_top_mask_single_process():
    values = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert top_mask(values, 3).tolist() == [F, T, T, T]
    assert top_mask(values, 0).tolist() == [F, F, F, F]
    assert top_mask(torch.zeros(0), 1).tolist() == []
    # ceil(0.5 * 4) = 2: the two 3.0s.
    assert distributed_top_mask(values, 0.5).tolist() == [F, T, F, T]



# --------------------------------------------------------------------------------------------- corpus cut


def point_mass_corpus(examples: int = 400, length: int = 50, seed: int = 0) -> tuple[torch.Tensor, list[int], list[str]]:
    """Scores with half the tokens at exactly 0 (LLMLingua-2's template tokens) and half uniform in (0.1, 1)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(examples * length, generator=generator) * 0.9 + 0.1
    scores[torch.rand(examples * length, generator=generator) < 0.5] = 0.0
    return scores, [length] * examples, [f"ex-{i:05d}" for i in range(examples)]


@pytest.mark.parametrize("rho", [0.3, 0.45])
def test_corpus_cut_splits_a_point_mass_at_the_threshold_to_one_minus_rho(rho):
    scores, lengths, ids = point_mass_corpus()
    zero_share = float((scores == 0).double().mean())
    cut = corpus_cut(summarize_scores(scores.numpy()), rho)
    assert cut.threshold == 0.0  # rho falls inside the point mass
    assert cut.tied == pytest.approx(zero_share, abs=2e-3) and cut.above == pytest.approx(1 - zero_share, abs=2e-3)
    assert cut.tie_fraction == pytest.approx(((1 - rho) - cut.above) / cut.tied)
    assert cut.expected_share == pytest.approx(1 - rho)
    loss_mask = torch.ones_like(scores, dtype=torch.bool)
    important = important_mask_packed(scores, loss_mask, lengths, rho, "corpus", threshold=cut, ids=ids)
    assert float(important.double().mean()) == pytest.approx(1 - rho, abs=0.01)  # `>=` gave 100%
    assert bool(important[scores > 0].all())  # every token above the threshold is in
    assert float(important_mask_packed(scores, loss_mask, lengths, rho, "corpus", threshold=0.0).double().mean()) == 1.0
    # Deterministic, and the tied tokens chosen are those whose tie key is below the fraction.
    keys = tie_keys(ids, lengths)
    assert torch.equal(important[scores == 0], keys[scores == 0] < cut.tie_fraction)
    assert torch.equal(important, important_mask_packed(scores, loss_mask, lengths, rho, "corpus", threshold=cut, ids=ids))


def test_corpus_cut_from_merged_shard_sketches_and_edge_cases():
    from schemas.shard import merge_summaries

    scores, lengths, ids = point_mass_corpus(seed=1)
    parts = [summarize_scores(part.numpy()) for part in scores.chunk(3)]
    cut = corpus_cut(merge_summaries(parts), 0.3)
    important = important_mask_packed(scores, torch.ones_like(scores, dtype=torch.bool), lengths, 0.3, "corpus",
                                      threshold=cut, ids=ids)
    assert float(important.double().mean()) == pytest.approx(0.7, abs=0.01)
    # Continuous scores: nothing tied at the threshold, the cut is the plain threshold.
    continuous = corpus_cut(summarize_scores(np.linspace(0.0, 1.0, 1001)), 0.25)
    assert continuous.threshold == pytest.approx(0.25) and continuous.tie_fraction == 1.0 and continuous.tied == 0.0
    # rho = 0: every token is important, even on a constant corpus.
    assert corpus_cut(summarize_scores(np.zeros(100)), 0.0).tie_fraction == 1.0
    constant = corpus_cut(summarize_scores(np.zeros(100)), 0.6)
    assert (constant.threshold, constant.tied, constant.above) == (0.0, 1.0, 0.0)
    assert constant.tie_fraction == pytest.approx(0.4)
    assert float(CorpusCut(0.5)) == 0.5 and CorpusCut(0.5).tie_fraction == 1.0


# --------------------------------------------------------------------------------------------- collective devices


@pytest.mark.parametrize("backend, expected", [("nccl", "cuda:0"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"),
                                               ("cuda:nccl", "cuda:0")])
def test_collective_device_follows_the_backend(monkeypatch, backend, expected):
    import torch.distributed as dist

    from train.grouping import collective_device

    assert collective_device() == torch.device("cpu")  # not distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert collective_device() == torch.device(expected)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("call", ["batch", "reduce"])
def test_no_cpu_tensor_reaches_an_nccl_collective(monkeypatch, call):
    """The trainer's batch scope passes CPU scores and masks; on an NCCL group (get_backend answers
    "nccl") every tensor handed to all_gather / all_reduce must be a CUDA tensor. The patched
    collectives record the devices and stop; without CUDA the move to it fails before any collective."""
    import torch.distributed as dist

    from train.grouping import all_reduce_sum

    seen: list[torch.device] = []

    def record_gather(out, tensor, group=None, async_op=False):
        seen.extend([tensor.device, *[t.device for t in out]])
        raise _Stop

    def record_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        raise _Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_gather", record_gather)
    monkeypatch.setattr(dist, "all_reduce", record_reduce)
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises((_Stop, RuntimeError, AssertionError)) as raised:
        if call == "batch":
            batch_important_masks([torch.tensor([0.3, 0.1, 0.2])], [mask(F, T, T)], 0.5, ids_list=[["a"]], seq_lens_list=[[3]])
        else:
            all_reduce_sum(torch.ones(3))
    assert all(device.type == "cuda" for device in seen), seen
    if not torch.cuda.is_available():  # the CUDA move itself failed: no collective ran on CPU tensors
        assert not seen and raised.type is not _Stop


@pytest.mark.parametrize("scope", ["sequence", "batch", "corpus"])
def test_the_trainers_group_masks_break_ties_by_the_tie_keys(scope):
    from train.step import group_masks

    lengths = [30, 25]
    step = [SimpleNamespace(score=torch.zeros(sum(lengths)), loss_mask=torch.ones(sum(lengths), dtype=torch.bool),
                            seq_lens=lengths, ids=["ex-a", "ex-b"])]
    step[0].loss_mask[[0, 30]] = False
    cut = corpus_cut(summarize_scores(np.zeros(100)), 0.7) if scope == "corpus" else None
    cfg = SimpleNamespace(importance=SimpleNamespace(scorer="tfidf", rho=0.7, scope=scope))
    expected = step_important_masks(step, 0.7, scope, cut)
    got = group_masks(step, cfg, cut)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
