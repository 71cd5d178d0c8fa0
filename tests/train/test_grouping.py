"""Grouping rules (data/grouping.py, train/grouping.py) against hand-computed masks: counts, ties,
scopes, packing, edge values of rho."""

from __future__ import annotations

import pytest
import torch

from data.grouping import important_mask_packed, important_mask_sequence, top_mask
from train.grouping import batch_important_masks, distributed_top_mask

T, F = True, False


def mask(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def test_sequence_top_half_of_trainable_tokens():
    # Position 0 is not trainable and has the highest score: it must never be important.
    scores = torch.tensor([10.0, 0.5, 0.3, 0.9, 0.2])
    loss_mask = mask(F, T, T, T, T)
    # n = 4 trainable, rho = 0.5 -> ceil(0.5 * 4) = 2 important: 0.9 (pos 3) and 0.5 (pos 1).
    assert important_mask_sequence(scores, loss_mask, 0.5).tolist() == [F, T, F, T, F]


def test_sequence_ties_earlier_position_wins():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert important_mask_sequence(scores, mask(T, T, T, T), 0.5).tolist() == [T, T, F, F]
    # A tie straddling the cut: rho = 0.6 -> ceil(0.4 * 5) = 2 places; 0.9 takes one, and the 0.7s
    # at positions 1, 2, 4 compete for the other: position 1 wins.
    scores = torch.tensor([0.9, 0.7, 0.7, 0.1, 0.7])
    assert important_mask_sequence(scores, mask(T, T, T, T, T), 0.6).tolist() == [T, T, F, F, F]
    # Skipping a non-trainable tied token: position 1 is masked, so position 2 wins the tie.
    assert important_mask_sequence(scores, mask(T, F, T, T, T), 0.5).tolist() == [T, F, T, F, F]


def test_rho_zero_makes_every_trainable_token_important():
    scores = torch.tensor([3.0, -1.0, 2.0, float("-inf"), 0.0])
    loss_mask = mask(T, T, F, T, T)
    assert important_mask_sequence(scores, loss_mask, 0.0).tolist() == [T, T, F, T, T]


def test_rho_close_to_one_keeps_one_token():
    scores = torch.tensor([0.2, 0.8, 0.5, 0.8])
    # ceil(0.01 * 4) = 1: the first of the two 0.8s.
    assert important_mask_sequence(scores, mask(T, T, T, T), 0.99).tolist() == [F, T, F, F]


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
    # Ties across micro-batches: the earlier micro-batch wins the last place.
    masks = batch_important_masks([torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])], [mask(T, T), mask(T, T)], 0.6)
    # ceil(0.4 * 4) = 2: 2.0, then the first 1.0 (micro-batch 0).
    assert [m.tolist() for m in masks] == [[T, T], [F, F]]


def test_batch_masks_equal_sequence_rule_on_the_concatenation():
    generator = torch.Generator().manual_seed(0)
    scores_list = [torch.randint(0, 4, (n,), generator=generator).float() for n in (5, 7, 3)]
    loss_masks = [torch.rand(n, generator=generator) > 0.3 for n in (5, 7, 3)]
    masks = batch_important_masks(scores_list, loss_masks, 0.7)
    expected = important_mask_sequence(torch.cat(scores_list), torch.cat(loss_masks), 0.7)
    assert torch.equal(torch.cat(masks), expected)


def test_top_mask_and_distributed_top_mask_single_process():
    values = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert top_mask(values, 3).tolist() == [F, T, T, T]
    assert top_mask(values, 0).tolist() == [F, F, F, F]
    assert top_mask(torch.zeros(0), 1).tolist() == []
    # ceil(0.5 * 4) = 2: the two 3.0s.
    assert distributed_top_mask(values, 0.5).tolist() == [F, T, F, T]

