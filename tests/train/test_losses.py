"""Every loss against hand-computed values and gradients (single process: local sums are global)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.conftest import implied_loss_config
from train.losses import LOSSES, DftLoss, InfoSftLoss, Rho1Loss, SelectLoss, SftGoLoss, SftLoss, WeightedLoss, build_loss

T, F = True, False


def leaf(*values: float) -> torch.Tensor:
    """Per-token losses as a leaf, so d(contribution)/d(l_t) is its .grad."""
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def mask(*values: bool) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def run(loss_fn, token_loss, important, ref_loss=None, step_tokens=None, progress=0.0):
    """Contribution value, gradient w.r.t. token_loss, metrics."""
    step_tokens = token_loss.numel() if step_tokens is None else step_tokens
    contribution, metrics = loss_fn(token_loss, important, ref_loss, step_tokens, progress)
    (grad,) = torch.autograd.grad(contribution, token_loss)
    return contribution.item(), grad.tolist(), metrics


def approx(values, abs=1e-6):
    return pytest.approx(values, abs=abs)


# ---------------------------------------------------------------------------------------------
# sft
# ---------------------------------------------------------------------------------------------


def test_sft_mean_over_step_tokens():
    l = leaf(1.0, 2.0, 3.0, 4.0)
    value, grad, metrics = run(SftLoss(), l, mask(T, F, T, F))
    assert value == approx(10 / 4)
    assert grad == approx([0.25] * 4)
    assert metrics["loss"] == approx(2.5)
    assert metrics["ce"] == approx(2.5)
    assert metrics["important_loss"] == approx(2.0)  # (1 + 3) / 2
    assert metrics["unimportant_loss"] == approx(3.0)  # (2 + 4) / 2
    assert metrics["worse_group"] == 0.0
    assert metrics["important_fraction"] == approx(0.5)
    assert metrics["lambda"] == 0.0
    assert metrics["tokens"] == 4.0


def test_sft_under_accumulation_divides_by_the_step_tokens():
    # This micro-batch holds 4 of the step's 8 tokens: 10 / 8, gradient 1 / 8 per token.
    value, grad, _ = run(SftLoss(), leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F), step_tokens=8)
    assert value == approx(1.25)
    assert grad == approx([0.125] * 4)


# ---------------------------------------------------------------------------------------------
# sftgo
# ---------------------------------------------------------------------------------------------


def test_sftgo_trains_the_unimportant_group_when_it_is_worse():
    # L_CE = 10 / 4 = 2.5, L_1 = (1 + 3) / 2 = 2, L_0 = (2 + 4) / 2 = 3 -> max is L_0.
    # L = 0.1 * 2.5 + 0.9 * 3 = 2.95; dL/dl = 0.1 / 4 (+ 0.9 / 2 for group 0) = 0.025 / 0.475.
    value, grad, metrics = run(SftGoLoss(lambda_=0.9), leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F))
    assert value == approx(2.95)
    assert grad == approx([0.025, 0.475, 0.025, 0.475])
    assert metrics["worse_group"] == 0.0
    assert metrics["lambda"] == approx(0.9)
    assert metrics["important_loss"] == approx(2.0)
    assert metrics["unimportant_loss"] == approx(3.0)


def test_sftgo_trains_the_important_group_when_it_is_worse():
    value, grad, metrics = run(SftGoLoss(lambda_=0.9), leaf(1.0, 2.0, 3.0, 4.0), mask(F, T, F, T))
    assert value == approx(2.95)
    assert grad == approx([0.025, 0.475, 0.025, 0.475])
    assert metrics["worse_group"] == 1.0


def test_sftgo_equal_means_go_to_the_important_group():
    # L_1 = (1 + 3) / 2 = 2 = L_0 = (2 + 2) / 2: the important group is trained.
    # L = 0.1 * 8 / 4 + 0.9 * 2 = 2.0; grads 0.025 + 0.45 on group 1, 0.025 on group 0.
    value, grad, metrics = run(SftGoLoss(lambda_=0.9), leaf(1.0, 3.0, 2.0, 2.0), mask(T, T, F, F))
    assert value == approx(2.0)
    assert grad == approx([0.475, 0.475, 0.025, 0.025])
    assert metrics["worse_group"] == 1.0


@pytest.mark.parametrize("all_important", [False, True])
def test_sftgo_empty_group_means_the_other_group(all_important):
    # One group holds every token: max(L_1, L_0) = L_CE = 2.5, so L = 2.5 and grads 1 / 4.
    important = mask(*([all_important] * 4))
    value, grad, metrics = run(SftGoLoss(lambda_=0.9), leaf(1.0, 2.0, 3.0, 4.0), important)
    assert value == approx(2.5)
    assert grad == approx([0.25] * 4)
    assert metrics["worse_group"] == float(all_important)
    # The empty group's mean is logged as 0.0, never NaN.
    assert metrics["important_loss" if not all_important else "unimportant_loss"] == 0.0
    assert metrics["important_fraction"] == float(all_important)


def test_sftgo_under_accumulation_weights_the_group_term_by_micro_batch_tokens():
    # step_tokens = 8, this micro-batch N_m = 4: w_m = 0.5.
    # L = 0.1 * 10 / 8 + 0.9 * 0.5 * (2 + 4) / 2 = 0.125 + 1.35 = 1.475
    # grads: 0.1 / 8 = 0.0125 (+ 0.9 * 0.5 / 2 = 0.225 for the worse group 0).
    value, grad, _ = run(SftGoLoss(lambda_=0.9), leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F), step_tokens=8)
    assert value == approx(1.475)
    assert grad == approx([0.0125, 0.2375, 0.0125, 0.2375])


def test_sftgo_two_micro_batches_sum_to_token_weighted_group_losses():
    loss_fn = SftGoLoss(lambda_=0.5)
    first, _ = loss_fn(leaf(1.0, 3.0), mask(T, F), None, 5, 0.0)  # worse: group 0 (3)
    second, _ = loss_fn(leaf(4.0, 1.0, 1.0), mask(T, F, F), None, 5, 0.0)  # worse: group 1 (4)
    # 0.5 * (1 + 3 + 4 + 1 + 1) / 5 + 0.5 * (2 / 5 * 3 + 3 / 5 * 4) = 1.0 + 0.5 * 3.6 = 2.8
    assert (first + second).item() == approx(2.8)


def test_sftgo_lambda_linear_decay_endpoints():
    loss_fn = SftGoLoss(lambda_schedule="linear", lambda_max=0.9, lambda_min=0.05)
    assert loss_fn.lambda_at(0.0) == approx(0.9)
    assert loss_fn.lambda_at(0.5) == approx(0.475)
    assert loss_fn.lambda_at(1.0) == approx(0.05)
    l, important = leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F)
    # progress 0: lambda 0.9 -> 2.95 as above.
    value, _, metrics = run(loss_fn, l, important, progress=0.0)
    assert value == approx(2.95) and metrics["lambda"] == approx(0.9)
    # progress 1: 0.95 * 2.5 + 0.05 * 3 = 2.525; grads 0.95 / 4 (+ 0.05 / 2).
    value, grad, metrics = run(loss_fn, l, important, progress=1.0)
    assert value == approx(2.525) and metrics["lambda"] == approx(0.05)
    assert grad == approx([0.2375, 0.2625, 0.2375, 0.2625])
    # The static schedule ignores progress.
    assert SftGoLoss(lambda_=0.9).lambda_at(1.0) == 0.9


def test_sftgo_lambda_zero_is_sft_and_one_is_the_worse_group_mean():
    l, important = leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F)
    value, grad, _ = run(SftGoLoss(lambda_=0.0), l, important)
    assert value == approx(2.5) and grad == approx([0.25] * 4)
    value, grad, _ = run(SftGoLoss(lambda_=1.0), l, important)
    assert value == approx(3.0) and grad == approx([0.0, 0.5, 0.0, 0.5])


def test_sftgo_rejects_bad_options():
    with pytest.raises(ValueError, match="lambda_schedule"):
        SftGoLoss(lambda_schedule="cosine")
    with pytest.raises(ValueError, match="lambda_"):
        SftGoLoss(lambda_=1.5)


# ---------------------------------------------------------------------------------------------
# rho1
# ---------------------------------------------------------------------------------------------


def test_rho1_trains_the_top_tokens_by_live_excess():
    l = leaf(1.0, 2.0, 3.0, 4.0, 5.0)
    ref = torch.tensor([0.5, 0.5, 2.9, 1.0, 5.0])
    # excess = [0.5, 1.5, 0.1, 3.0, 0.0]; rho 0.5 -> k = ceil(2.5) = 3: positions 3, 1, 0.
    # L = (1 + 2 + 4) / 3 = 7 / 3; grads 1 / 3 on them, 0 elsewhere.
    value, grad, metrics = run(Rho1Loss(rho=0.5), l, mask(F, F, F, F, F), ref)
    assert value == approx(7 / 3)
    assert grad == approx([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0])
    assert metrics["important_fraction"] == approx(0.6)
    assert metrics["important_loss"] == approx(7 / 3)
    assert metrics["unimportant_loss"] == approx(4.0)  # (3 + 5) / 2
    assert metrics["ce"] == approx(3.0)
    assert metrics["lambda"] == 1.0


def test_rho1_under_accumulation_and_ties():
    l = leaf(1.0, 2.0, 3.0, 4.0, 5.0)
    # Equal excess everywhere (ref = l): the first 3 positions win. w_m = 5 / 10.
    # L = 0.5 * (1 + 2 + 3) / 3 = 1.0; grads 0.5 / 3.
    value, grad, _ = run(Rho1Loss(rho=0.5), l, mask(F, F, F, F, F), l.detach().clone(), step_tokens=10)
    assert value == approx(1.0)
    assert grad == approx([1 / 6, 1 / 6, 1 / 6, 0.0, 0.0])


def test_rho1_rho_zero_is_sft_and_needs_ref_loss():
    l = leaf(1.0, 2.0, 3.0, 4.0)
    value, grad, _ = run(Rho1Loss(rho=0.0), l, mask(F, F, F, F), torch.zeros(4))
    assert value == approx(2.5) and grad == approx([0.25] * 4)
    with pytest.raises(ValueError, match="ref_loss"):
        Rho1Loss(rho=0.5)(l, mask(F, F, F, F), None, 4, 0.0)


# ---------------------------------------------------------------------------------------------
# infosft and dft
# ---------------------------------------------------------------------------------------------


def test_infosft_weights_and_gradient():
    # q = [0.5, 0.2, 0.95, 0.57], logit(0.93) = ln(0.93 / 0.07) = 2.586689.
    # w(0.5) = 0.5 * (1 - 0) = 0.5
    # w(0.2) = 0.2 * (1 + ln 4 / 2.586689) = 0.307187
    # w(0.95) = 0 (q >= P)
    # w(0.57) = 0.57 * (1 - ln(0.57 / 0.43) / 2.586689) = 0.507892
    probabilities = [0.5, 0.2, 0.95, 0.57]
    l = leaf(*[-math.log(q) for q in probabilities])
    expected_weights = [0.5, 0.3071868, 0.0, 0.5078916]
    assert InfoSftLoss().weights(l).tolist() == approx(expected_weights)
    # L = (0.5 * 0.693147 + 0.307187 * 1.609438 + 0 + 0.507892 * 0.562119) / 4 = 0.281617;
    # the weight is stop-gradient, so dL/dl_t = w_t / 4.
    value, grad, _ = run(InfoSftLoss(p=0.93), l, mask(F, F, F, F))
    assert value == approx(0.2816168)
    assert grad == approx([w / 4 for w in expected_weights])


def test_infosft_weight_peaks_near_057_and_stays_finite():
    q = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    weights = InfoSftLoss().weights(-torch.log(q))
    assert 0.55 <= q[weights.argmax()].item() <= 0.59
    # Extreme losses: l = 0 (q = 1) and huge l (q underflows to 0) give finite weights >= 0.
    extreme = InfoSftLoss().weights(torch.tensor([0.0, 1e-9, 50.0, 800.0, 1e6]))
    assert torch.isfinite(extreme).all() and (extreme >= 0).all()
    assert extreme[:2].tolist() == [0.0, 0.0]


def test_dft_weights_by_detached_probability():
    # q = [0.5, 0.25]: L = (0.5 * ln 2 + 0.25 * ln 4) / 2 = 0.346574; dL/dl = q / 2.
    l = leaf(math.log(2.0), math.log(4.0))
    value, grad, metrics = run(DftLoss(), l, mask(T, F))
    assert value == approx(0.3465736)
    assert grad == approx([0.25, 0.125])
    assert metrics["ce"] == approx((math.log(2.0) + math.log(4.0)) / 2)


# eaft: three rows of 4 logits, k = 3 (the 4th logit never counts).
#   A = [ln 2, 0, 0, -7]:   top-3 p = [1/2, 1/4, 1/4], H = 1/2 ln 2 + 1/2 ln 4 = 1.0397208, / ln 3 = 0.9463946
#   B = [0, 0, 0, -7]:      top-3 uniform, H / ln 3 = 1
#   C = [ln 6, ln 3, 0, -1]: top-3 p = [0.6, 0.3, 0.1],
#                            H = 0.6 * 0.5108256 + 0.3 * 1.2039728 + 0.1 * 2.3025851 = 0.8979457, / ln 3 = 0.8173454
EAFT_LOGITS = [[math.log(2.0), 0.0, 0.0, -7.0], [0.0, 0.0, 0.0, -7.0], [math.log(6.0), math.log(3.0), 0.0, -1.0]]
EAFT_ENTROPY = [0.9463946, 1.0, 0.8173454]


def test_top_k_entropy_by_hand():
    from data.token_loss import top_k_entropy

    logits = torch.tensor(EAFT_LOGITS)
    assert top_k_entropy(logits, 3, None).tolist() == approx(EAFT_ENTROPY)
    # k = 2: A's top-2 [ln 2, 0] gives p = [2/3, 1/3], H = 0.6365142, / ln 2 = 0.9182958 (the binary entropy in bits).
    assert top_k_entropy(logits[:1], 2, None).item() == approx(0.9182958)
    # k above the vocabulary: all 4 logits, normalised by ln 4.
    # B: p = 3 x 1/(3 + e^-7), e^-7 / (3 + e^-7) (e^-7 = 0.000911882): H = 1.1010433, / ln 4 = 0.7942348.
    assert top_k_entropy(logits[1:2], 50, None).item() == approx(0.7942348)
    # The model's final-logit transform counts (a soft-cap of 1 squeezes C's logits to tanh: a flatter top 3).
    from data.token_loss import LogitTransform

    capped = torch.tanh(logits[2:3])
    assert top_k_entropy(logits[2:3], 3, LogitTransform(softcap=1.0)).item() == approx(top_k_entropy(capped, 3, None).item())
    with pytest.raises(ValueError, match="k >= 2"):
        top_k_entropy(logits, 1, None)


def test_eaft_weights_ce_by_the_detached_top_k_entropy_to_the_power_alpha():
    # Targets A -> 3 (the -7 logit), B -> 0, C -> 0:
    #   l_A = ln(4 + e^-7) + 7 = 8.3865223, l_B = ln(3 + e^-7) = 1.0989162, l_C = ln(10 + e^-1) - ln 6 = 0.5469530.
    # alpha = 2: w = [0.9463946^2, 1, 0.8173454^2] = [0.8956628, 1.0, 0.6680535].
    # One more token of the step elsewhere (step_tokens 4):
    #   L = (0.8956628 * 8.3865223 + 1.0989162 + 0.6680535 * 0.5469530) / 4 = 2.2439515; dL/dl = w / 4.
    logits = torch.tensor(EAFT_LOGITS, requires_grad=True)
    targets = torch.tensor([3, 0, 0])
    token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert token_loss.tolist() == approx([8.3865223, 1.0989162, 0.5469530])
    from data.token_loss import top_k_entropy

    entropy = top_k_entropy(logits, 3, None)
    loss_fn = build_loss("eaft", k=3, alpha=2.0)
    assert loss_fn.entropy_top_k == 3 and not loss_fn.reads_score()
    contribution, metrics = loss_fn(token_loss, mask(T, F, F), None, 4, 0.0, entropy=entropy)
    weights = [0.8956628, 1.0, 0.6680535]
    assert contribution.item() == approx(2.2439515)
    assert metrics["mean_weight"] == approx(sum(weights) / 3)
    assert metrics["ce"] == approx((8.3865223 + 1.0989162 + 0.5469530) / 3) and metrics["lambda"] == 0.0
    # The weight is stop-gradient: d/dlogits = w (softmax - onehot) / 4, no term through the entropy.
    (grad,) = torch.autograd.grad(contribution, logits)
    softmax = torch.softmax(logits.detach(), -1)
    expected = torch.tensor(weights)[:, None] * (softmax - torch.nn.functional.one_hot(targets, 4)) / 4
    assert torch.allclose(grad, expected, atol=1e-6)
    # alpha 0: every weight 1, plain SFT (an entropy of 0 included: 0 ** 0 = 1).
    l = leaf(1.0, 3.0)
    value, grad, _ = run_with(build_loss("eaft", alpha=0.0), l, mask(F, F), entropy=torch.tensor([0.0, 0.5]))
    assert value == approx(2.0) and grad == approx([0.5, 0.5])
    # alpha 1 (the default): w = the normalised entropy itself.
    value, grad, _ = run_with(build_loss("eaft"), leaf(2.0, 4.0), mask(F, F), entropy=torch.tensor([0.25, 0.5]))
    assert value == approx((0.25 * 2.0 + 0.5 * 4.0) / 2) and grad == approx([0.125, 0.25])
    with pytest.raises(ValueError, match="entropy"):
        build_loss("eaft")(leaf(1.0), mask(F), None, 1, 0.0)


def test_eaft_options_are_checked():
    assert build_loss("eaft").options.k == 20 and build_loss("eaft").options.alpha == 1.0  # EAFT's code: k 20, alpha 1
    for bad in ({"k": 1}, {"k": 0}, {"k": 2.5}, {"k": True}, {"alpha": -0.5}, {"alpha": float("nan")}):
        with pytest.raises(ValueError, match="k:|alpha:"):
            build_loss("eaft", **bad)
    from train.losses import EaftOptions

    assert EaftOptions(k=1, alpha=-1.0).problems(as_key=True) == [
        "loss.eaft_k: 1 must be an integer >= 2", "loss.eaft_alpha: -1.0 must be a finite number >= 0"]


def run_with(loss_fn, token_loss, important, **kwargs):
    """:func:`run` with the loss's extra keywords (eaft's entropy)."""
    contribution, metrics = loss_fn(token_loss, important, None, token_loss.numel(), 0.0, **kwargs)
    (grad,) = torch.autograd.grad(contribution, token_loss)
    return contribution.item(), grad.tolist(), metrics


def test_weighted_losses_stop_gradient_through_the_weight_at_the_logits():
    # Through a softmax: d(sg(w) * l)/dlogits = w * (softmax - onehot) when w is stop-gradient.
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 2])
    onehot = torch.nn.functional.one_hot(targets, 3).float()
    softmax = torch.softmax(logits.detach(), dim=-1)
    q = softmax[torch.arange(2), targets]
    for loss_fn, weights in ((DftLoss(), q), (InfoSftLoss(), InfoSftLoss().weights(-torch.log(q)).float())):
        token_loss = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        contribution, _ = loss_fn(token_loss, mask(F, F), None, 2, 0.0)
        (grad,) = torch.autograd.grad(contribution, logits)
        expected = weights[:, None] * (softmax - onehot) / 2
        assert torch.allclose(grad, expected, atol=1e-6)


def test_select_trains_the_important_tokens_only_and_logs_the_fraction_kept():
    # important = [T, F, T, F]: L = (1 + 3) / 2 = 2; dL/dl = [1/2, 0, 1/2, 0].
    l = leaf(1.0, 2.0, 3.0, 4.0)
    value, grad, metrics = run(SelectLoss(), l, mask(T, F, T, F))
    assert value == approx(2.0) and grad == approx([0.5, 0.0, 0.5, 0.0])
    assert metrics["important_fraction"] == 0.5 and metrics["lambda"] == 1.0 and metrics["ce"] == approx(2.5)
    # Accumulation: this micro-batch holds 4 of the step's 8 tokens: w = 4 / 8, so L = 0.5 * 2.
    value, grad, _ = run(SelectLoss(), leaf(1.0, 2.0, 3.0, 4.0), mask(T, F, T, F), step_tokens=8)
    assert value == approx(1.0) and grad == approx([0.25, 0.0, 0.25, 0.0])
    # Nothing important: no gradient anywhere, and the graph is kept.
    value, grad, metrics = run(SelectLoss(), leaf(1.0, 2.0), mask(F, F))
    assert value == 0.0 and grad == [0.0, 0.0] and metrics["important_fraction"] == 0.0


def test_weighted_loss_is_the_weighted_mean_over_the_step():
    # w = [1, 0, 3], step weight 4 (this micro-batch alone): L = (1*1 + 0*2 + 3*3) / 4 = 2.5; dL/dl = w / 4.
    l, weight = leaf(1.0, 2.0, 3.0), torch.tensor([1.0, 0.0, 3.0])
    contribution, metrics = WeightedLoss(transform="identity")(l, mask(F, F, F), None, 3, 0.0, weight=weight, step_weight=4.0)
    (grad,) = torch.autograd.grad(contribution, l)
    assert contribution.item() == approx(2.5) and grad.tolist() == approx([0.25, 0.0, 0.75])
    assert metrics["mean_weight"] == approx(4 / 3)
    # Another micro-batch of the step holds weight 4 more: the same tokens count half as much.
    contribution, _ = WeightedLoss(transform="identity")(leaf(1.0, 2.0, 3.0), mask(F, F, F), None, 6, 0.0, weight=weight, step_weight=8.0)
    assert contribution.item() == approx(1.25)
    with pytest.raises(ValueError, match="weight shaped like token_loss"):
        WeightedLoss()(l, mask(F, F, F), None, 3, 0.0)


def test_weight_transforms():
    score = torch.tensor([9.0, 0.5, -1.0, 2.0, 2.0, 7.0, 0.0])
    loss_mask = torch.tensor([F, T, T, T, T, T, T])  # position 0 is not trainable: weight 0 whatever its score
    seq_lens = [5, 2]  # example 1: positions 0-4 (trainable 1-4), example 2: positions 5-6
    identity = WeightedLoss(transform="identity").token_weights(score, loss_mask, seq_lens, "sequence")
    assert identity.tolist() == approx([0.0, 0.5, 0.0, 2.0, 2.0, 7.0, 0.0])  # -1 clipped to clip_min 0
    # Ranks within each example: [0.5, -1, 2, 2] -> ranks [1, 0, 2.5, 2.5] / 3; [7, 0] -> [1, 0].
    ranked = WeightedLoss(transform="rank").token_weights(score, loss_mask, seq_lens, "sequence")
    assert ranked.tolist() == approx([0.0, 1 / 3, 0.0, 2.5 / 3, 2.5 / 3, 1.0, 0.0])
    # Corpus scope: the CDF from the quantile sketch (here scores uniform on [0, 10]).
    corpus = WeightedLoss(transform="rank").token_weights(score, loss_mask, seq_lens, "corpus", [0.0, 5.0, 10.0])
    assert corpus.tolist() == approx([0.0, 0.05, 0.0, 0.2, 0.2, 0.7, 0.0])
    sigmoid = WeightedLoss(transform="sigmoid", center=2.0, temperature=0.5, clip_max=0.9).token_weights(score, loss_mask, seq_lens, "sequence")
    assert sigmoid.tolist() == approx([0.0, 1 / (1 + math.exp(3.0)), 1 / (1 + math.exp(6.0)), 0.5, 0.5, 0.9, 1 / (1 + math.exp(4.0))])
    with pytest.raises(ValueError, match="scope sequence or corpus"):
        WeightedLoss(transform="rank").token_weights(score, loss_mask, seq_lens, "batch")
    with pytest.raises(ValueError, match="clip_min: -1.0 must be >= 0"):
        WeightedLoss(clip_min=-1.0)


# ---------------------------------------------------------------------------------------------
# Registry and contract
# ---------------------------------------------------------------------------------------------


def test_registry_builds_every_loss_by_name():
    assert set(LOSSES) == {"sft", "sftgo", "rho1", "infosft", "dft", "eaft", "select", "weighted"}
    assert isinstance(build_loss("sftgo", lambda_=0.5), SftGoLoss)
    assert isinstance(build_loss("rho1", rho=0.4), Rho1Loss)
    assert build_loss("rho1", rho=0.4).needs_ref_loss and not build_loss("sft").needs_ref_loss
    assert build_loss("sftgo").needs_groups and not build_loss("dft").needs_groups
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("dpo")
    with pytest.raises(TypeError):
        build_loss("sft", lambda_=0.9)


@pytest.mark.parametrize("name,options", [("sft", {}), ("sftgo", {}), ("rho1", {"rho": 0.5}), ("infosft", {}), ("dft", {}),
                                          ("select", {})])
def test_empty_micro_batch_contributes_zero_with_a_graph(name, options):
    token_loss = torch.zeros(0, requires_grad=True)
    contribution, metrics = build_loss(name, **options)(token_loss, mask(), torch.zeros(0), 4, 0.3)
    contribution.backward()
    assert contribution.item() == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["ce"] == 0.0 and metrics["important_fraction"] == 0.0


def test_contract_checks():
    l, important = leaf(1.0, 2.0), mask(T, F)
    with pytest.raises(ValueError, match="step_tokens"):
        SftLoss()(l, important, None, 1, 0.0)
    with pytest.raises(ValueError, match="progress"):
        SftLoss()(l, important, None, 2, 1.5)
    with pytest.raises(ValueError, match="bool"):
        SftLoss()(l, torch.tensor([1, 0]), None, 2, 0.0)


def test_a_new_loss_is_one_class_its_options_reach_config_and_validation():
    """Registering a class is all it takes: its options become loss.<key> config keys with help, are
    validated by their own problems(), and reach the constructor through kwargs()."""
    from dataclasses import dataclass

    from data.config import option
    from train import config as train_config
    from train.losses import Loss, register

    @dataclass
    class ScaledOptions:
        scale: float = option(0.5, "scaled: factor on the CE, in (0, 1]", key="scaled_scale")

        def problems(self, as_key: bool = False) -> list[str]:
            name = "loss.scaled_scale" if as_key else "scale"
            return [] if 0 < self.scale <= 1 else [f"{name}: {self.scale} must be in (0, 1]"]

    @register
    class ScaledLoss(Loss):
        name = "scaled"
        Options = ScaledOptions

        def __call__(self, token_loss, important, ref_loss, step_tokens, progress):
            return self.options.scale * token_loss.sum() / step_tokens, {}

    try:
        section = implied_loss_config()
        assert section().scaled_scale == 0.5
        assert train_config.loss_options_of(section(scaled_scale=0.25), ScaledLoss) == ScaledOptions(0.25)
        assert ScaledLoss.kwargs(ScaledOptions(0.25), importance_rho=0.7) == {"scale": 0.25}
        assert ScaledOptions(2.0).problems(as_key=True) == ["loss.scaled_scale: 2.0 must be in (0, 1]"]
        with pytest.raises(ValueError, match="scale: 2.0 must be in"):
            build_loss("scaled", scale=2.0)
        value, _ = build_loss("scaled", scale=0.25)(leaf(2.0, 2.0), mask(T, F), None, 2, 0.0)
        assert value.item() == approx(0.5)
        assert ScaledLoss.label(lambda key: None) == "scaled"
    finally:
        LOSSES.pop("scaled")


def test_each_loss_declares_what_the_trainer_must_load():
    assert [n for n, cls in LOSSES.items() if cls.needs_ref_loss] == ["rho1"]
    assert sorted(n for n, cls in LOSSES.items() if cls.needs_groups) == ["select", "sftgo"]
    assert [n for n, cls in LOSSES.items() if cls.needs_weights] == ["weighted"]
    assert [n for n, cls in LOSSES.items() if not cls.reads_score()] == ["sft", "infosft", "dft", "eaft"]
    assert [n for n, cls in LOSSES.items() if cls.entropy_top_k is not None or n == "eaft"] == ["eaft"]


# ---------------------------------------------------------------------------------------------
# group_decision=step: the decision over the whole optimizer step (single process)
# ---------------------------------------------------------------------------------------------


def step_contributions(loss_fn, micro, decide, ref=None):
    """Each micro-batch's (value, grad) with the step's token count; decisions from ``decide`` or none."""
    step_tokens = sum(len(l) for l, _ in micro)
    decisions = (loss_fn.decide([m for _, m in micro], [torch.tensor(l) for l, _ in micro], ref) if decide
                 else [None] * len(micro))
    out = []
    for i, ((values, important), decision) in enumerate(zip(micro, decisions)):
        l = leaf(*values)
        kwargs = {} if decision is None else {"decision": decision}
        contribution, metrics = loss_fn(l, important, None if ref is None else ref[i], step_tokens, 0.0, **kwargs)
        (grad,) = torch.autograd.grad(contribution, l)
        out.append((contribution.item(), grad.tolist(), metrics))
    return out


def test_sftgo_step_decision_is_the_max_over_the_step_not_the_mean_of_micro_batch_maxima():
    # Micro-batch A: important [3], unimportant [1]; B: important [1], unimportant [2]. lambda 1.
    # Per micro-batch: A's max 3, B's max 2, weighted 2/4 each -> 2.5.
    # The step: important mean (3 + 1) / 2 = 2, unimportant (1 + 2) / 2 = 1.5 -> max 2.0, the important group.
    micro = [([3.0, 1.0], mask(T, F)), ([1.0, 2.0], mask(T, F))]
    loss_fn = SftGoLoss(lambda_=1.0)
    per_micro = step_contributions(loss_fn, micro, decide=False)
    assert sum(v for v, _, _ in per_micro) == approx(2.5)
    step = step_contributions(loss_fn, micro, decide=True)
    assert sum(v for v, _, _ in step) == approx(2.0)
    # Gradient: 1 / 2 on each important token (the step's 2 important tokens), 0 on the others.
    assert [g for _, grad, _ in step for g in grad] == approx([0.5, 0.0, 0.5, 0.0])
    # Every micro-batch logs the step's groups: the trainer's token-weighted mean is the step's value.
    for _, _, metrics in step:
        assert metrics["worse_group"] == 1.0
        assert metrics["important_loss"] == approx(2.0)
        assert metrics["unimportant_loss"] == approx(1.5)
        assert metrics["ce"] == approx(7 / 4)
        assert metrics["tokens"] == 2.0
    # B alone would train its unimportant group; per micro-batch it does.
    assert per_micro[1][2]["worse_group"] == 0.0


def test_sftgo_step_decision_with_lambda_mixes_the_step_ce():
    micro = [([3.0, 1.0], mask(T, F)), ([1.0, 2.0], mask(T, F))]
    step = step_contributions(SftGoLoss(lambda_=0.9), micro, decide=True)
    assert sum(v for v, _, _ in step) == approx(0.1 * 7 / 4 + 0.9 * 2.0)
    assert [g for _, grad, _ in step for g in grad] == approx([0.025 + 0.45, 0.025, 0.025 + 0.45, 0.025])


def test_rho1_step_decision_ranks_the_whole_step():
    # Excess = l - ref: A [2.0, 0.5], B [1.5, 0.1]; rho 0.5 -> the top ceil(0.5 * 4) = 2 of the step: A0 and B0.
    # Per micro-batch each keeps its own top 1 too here; make B's top token lose: B [0.4, 0.1].
    micro = [([2.0, 0.5], mask(F, F)), ([0.4, 0.1], mask(F, F))]
    ref = [torch.zeros(2), torch.zeros(2)]
    loss_fn = Rho1Loss(rho=0.5)
    step = step_contributions(loss_fn, micro, decide=True, ref=ref)
    assert sum(v for v, _, _ in step) == approx((2.0 + 0.5) / 2)  # A's two tokens: the step's top 2
    assert [g for _, grad, _ in step for g in grad] == approx([0.5, 0.5, 0.0, 0.0])
    for _, _, metrics in step:
        assert metrics["important_fraction"] == approx(0.5)
        assert metrics["important_loss"] == approx(1.25)
    per_micro = step_contributions(loss_fn, micro, decide=False, ref=ref)
    assert sum(v for v, _, _ in per_micro) == approx(0.5 * 2.0 + 0.5 * 0.4)  # each micro-batch's own top 1


def test_select_step_decision_divides_by_the_steps_important_count():
    # A: 1 important of 2 (loss 3); B: 2 important of 2 (losses 1, 2). Step mean over important: (3 + 1 + 2) / 3 = 2.
    # Per micro-batch: 2/4 * 3 + 2/4 * 1.5 = 2.25.
    micro = [([3.0, 1.0], mask(T, F)), ([1.0, 2.0], mask(T, T))]
    loss_fn = SelectLoss()
    step = step_contributions(loss_fn, micro, decide=True)
    assert sum(v for v, _, _ in step) == approx(2.0)
    assert [g for _, grad, _ in step for g in grad] == approx([1 / 3, 0.0, 1 / 3, 1 / 3])
    # select decides from the masks alone: no token losses needed.
    assert loss_fn.decide([m for _, m in micro])[0].trained_tokens == 3
    assert sum(v for v, _, _ in step_contributions(loss_fn, micro, decide=False)) == approx(2.25)


def test_step_decision_flags_and_errors():
    assert {name for name, cls in LOSSES.items() if cls.decides_per_step} == {"sftgo", "rho1", "select"}
    assert {name for name, cls in LOSSES.items() if cls.needs_lookahead} == {"sftgo", "rho1"}
    with pytest.raises(ValueError, match="live token losses"):
        SftGoLoss().decide([mask(T, F)])
    with pytest.raises(ValueError, match="ref_loss"):
        Rho1Loss(rho=0.5).decide([mask(T, F)], [torch.tensor([1.0, 2.0])], [None])
    with pytest.raises(NotImplementedError):
        SftLoss().decide([mask(T, F)])
    # An empty micro-batch (a rank out of data) carries no ref_loss: rho1 still decides and contributes 0.
    (decision,) = Rho1Loss(rho=0.5).decide([mask()], [torch.zeros(0)], [None])
    assert decision.trained_tokens == 0
    value, _, _ = run(Rho1Loss(rho=0.5), leaf(), mask(), None, step_tokens=0)
    assert value == 0.0
