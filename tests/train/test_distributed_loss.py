"""Two gloo ranks on CPU reproduce the single-process loss, its gradient and the batch grouping.

Each rank holds part of every micro-batch of an optimizer step (unequal sizes, so the variable-size
all-gather is exercised). Summing each rank's parameter gradients (all_reduce SUM: what DeepSpeed's
averaging times the world size gives) must equal the gradient of the single-process loss on the
concatenated micro-batches. With one micro-batch per step the loss must also equal METHOD.md's
global-batch formula written out directly.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as functional

from data.token_loss import top_k_entropy
from train.grouping import batch_important_masks
from train.losses import build_loss

WORLD_SIZE = 2
FEATURES, VOCAB = 4, 5
# Tokens per (rank, micro-batch): rank 0 holds [3, 4], rank 1 holds [5, 2].
SIZES = [[3, 4], [5, 2]]
LOSSES = {"sft": {}, "sftgo": {"lambda_": 0.9}, "rho1": {"rho": 0.4}, "select": {}, "weighted": {"transform": "identity"},
          "eaft": {"k": 3, "alpha": 1.5}}
# "accumulation": both micro-batches in one step; "single": micro-batch 0 alone.
SCENARIOS = {"accumulation": [0, 1], "single": [0]}


def make_model() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, VOCAB)


def make_data() -> list[list[dict[str, torch.Tensor]]]:
    """data[rank][micro_batch]: trainable tokens' features, targets, groups, ref losses; plus scores."""
    generator = torch.Generator().manual_seed(1)
    data = []
    for rank_sizes in SIZES:
        micro_batches = []
        for n in rank_sizes:
            micro_batches.append(
                {
                    "features": torch.randn(n, FEATURES, generator=generator),
                    "targets": torch.randint(0, VOCAB, (n,), generator=generator),
                    "important": torch.rand(n, generator=generator) > 0.5,
                    "ref_loss": torch.rand(n, generator=generator) * 2.0,
                    "weight": torch.rand(n, generator=generator) * 3.0,  # the weighted loss's per-token weights
                    # Grouping inputs: small integer scores (many ties, some across ranks) over
                    # n + 2 positions, two of which are not trainable.
                    "scores": torch.randint(0, 3, (n + 2,), generator=generator).float(),
                    "loss_mask": torch.cat([torch.tensor([False]), torch.ones(n, dtype=torch.bool), torch.tensor([False])]),
                }
            )
        data.append(micro_batches)
    return data


def batch_ids(rank: int, micro_batch: int) -> list[str]:
    """Example ids of a grouping micro-batch: two packed examples each (the tie keys hash them)."""
    return [f"r{rank}-m{micro_batch}-a", f"r{rank}-m{micro_batch}-b"]


def batch_lens(micro_batch: dict[str, torch.Tensor]) -> list[int]:
    """Two packed examples: the first two positions, then the rest."""
    return [2, micro_batch["loss_mask"].numel() - 2]


def step_loss_and_grads(
    model: torch.nn.Linear, micro_batches: list[dict[str, torch.Tensor]], name: str
) -> tuple[float, list[torch.Tensor]]:
    """Sum of the loss contributions over the step's micro-batches, and the accumulated gradient."""
    loss_fn = build_loss(name, **LOSSES[name])
    step_tokens_local = sum(len(mb["targets"]) for mb in micro_batches)
    counts = torch.tensor([float(step_tokens_local), float(sum(mb["weight"].double().sum() for mb in micro_batches))],
                          dtype=torch.float64)
    if dist.is_initialized():  # the trainer counts the step's tokens (and weights) on all ranks before the step
        dist.all_reduce(counts)
    step_tokens, step_weight = int(counts[0].item()), float(counts[1].item())
    extra = {"weight": None, "step_weight": step_weight} if getattr(loss_fn, "needs_weights", False) else None
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro_batches:
        logits = model(mb["features"])
        token_loss = functional.cross_entropy(logits, mb["targets"], reduction="none")
        kwargs = {} if extra is None else {**extra, "weight": mb["weight"]}
        if loss_fn.entropy_top_k is not None:  # eaft: the live top-k entropy of the same logits
            kwargs["entropy"] = top_k_entropy(logits, loss_fn.entropy_top_k, None)
        contribution, _ = loss_fn(token_loss, mb["important"], mb["ref_loss"], step_tokens, 0.0, **kwargs)
        contribution.backward()
        total += contribution.item()
    return total, [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = make_model()
        data = make_data()[rank]
        results: dict[str, object] = {}
        for scenario, indices in SCENARIOS.items():
            for name in LOSSES:
                loss, grads = step_loss_and_grads(model, [data[i] for i in indices], name)
                total = torch.tensor([loss], dtype=torch.float64)
                dist.all_reduce(total)
                for grad in grads:
                    dist.all_reduce(grad)
                results[f"{scenario}/{name}/loss"] = total.item()
                results[f"{scenario}/{name}/grads"] = grads
        results["batch_masks"] = batch_important_masks(
            [mb["scores"] for mb in data], [mb["loss_mask"] for mb in data], rho=0.5,
            ids_list=[batch_ids(rank, i) for i in range(len(data))], seq_lens_list=[batch_lens(mb) for mb in data],
        )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, object]]:
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def concatenated(micro_batch: int) -> dict[str, torch.Tensor]:
    """The single-process micro-batch: rank 0's tokens, then rank 1's."""
    data = make_data()
    return {key: torch.cat([data[rank][micro_batch][key] for rank in range(WORLD_SIZE)]) for key in data[0][0]}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_summed_rank_gradients_equal_the_single_process_gradient(rank_results, scenario, name):
    reference_loss, reference_grads = step_loss_and_grads(
        make_model(), [concatenated(i) for i in SCENARIOS[scenario]], name
    )
    for result in rank_results:  # every rank holds the same all-reduced numbers
        assert result[f"{scenario}/{name}/loss"] == pytest.approx(reference_loss, abs=1e-6)
        for grad, reference in zip(result[f"{scenario}/{name}/grads"], reference_grads):
            assert torch.allclose(grad, reference, atol=1e-6, rtol=0), (grad - reference).abs().max()


@pytest.mark.timeout(120)
def test_single_micro_batch_matches_the_method_formula(rank_results):
    """With one micro-batch per step, the summed contributions are METHOD.md's global-batch loss."""
    batch = concatenated(0)
    with torch.no_grad():
        token_loss = functional.cross_entropy(make_model()(batch["features"]), batch["targets"], reduction="none")
    important = batch["important"]
    worse = max(token_loss[important].mean(), token_loss[~important].mean())
    sftgo = 0.1 * token_loss.mean() + 0.9 * worse
    excess = token_loss - batch["ref_loss"]
    k = 5  # ceil((1 - 0.4) * 8)
    rho1 = token_loss[torch.topk(excess, k).indices].mean()
    assert rank_results[0]["single/sft/loss"] == pytest.approx(token_loss.mean().item(), abs=1e-6)
    assert rank_results[0]["single/sftgo/loss"] == pytest.approx(sftgo.item(), abs=1e-6)
    assert rank_results[0]["single/rho1/loss"] == pytest.approx(rho1.item(), abs=1e-6)
    assert rank_results[0]["single/select/loss"] == pytest.approx(token_loss[important].mean().item(), abs=1e-6)
    weight = batch["weight"]
    assert rank_results[0]["single/weighted/loss"] == pytest.approx((weight * token_loss).sum().item() / weight.sum().item(), abs=1e-6)


@pytest.mark.timeout(120)
def test_eaft_over_ranks_and_micro_batches_is_the_step_formula(rank_results):
    """EAFT: sum over the step's tokens on both ranks of sg(H_3 / ln 3)^1.5 * l_t, over the step's 14 tokens,
    written out from the concatenated batch (the top-3 entropy recomputed here from softmax by hand)."""
    batches = [concatenated(0), concatenated(1)]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = make_model()(batch["features"])
            top = torch.softmax(logits.topk(3, dim=-1).values, dim=-1)
            weight = (-(top * top.log()).sum(-1) / math.log(3)) ** 1.5
            total += (weight * functional.cross_entropy(logits, batch["targets"], reduction="none")).sum().item()
            count += len(batch["targets"])
    assert count == 14
    for result in rank_results:
        assert result["accumulation/eaft/loss"] == pytest.approx(total / count, abs=1e-6)
    # It is not the plain CE: the weights matter.
    assert abs(rank_results[0]["accumulation/eaft/loss"] - rank_results[0]["accumulation/sft/loss"]) > 1e-2


@pytest.mark.timeout(120)
def test_batch_grouping_across_ranks_equals_single_process(rank_results):
    data = make_data()
    # Single process, the micro-batches in any order: the tie keys follow (example id, position), not
    # the rank or micro-batch, so rank 0's-then-rank 1's and the reverse give the same groups.
    in_order = [(rank, i, mb) for rank in range(WORLD_SIZE) for i, mb in enumerate(data[rank])]
    got = torch.cat([mask for result in rank_results for mask in result["batch_masks"]])
    for order in (in_order, in_order[::-1]):
        expected = batch_important_masks([mb["scores"] for _, _, mb in order], [mb["loss_mask"] for _, _, mb in order], 0.5,
                                         ids_list=[batch_ids(r, i) for r, i, _ in order],
                                         seq_lens_list=[batch_lens(mb) for _, _, mb in order])
        by_batch = {(r, i): m for (r, i, _), m in zip(order, expected)}
        assert torch.equal(got, torch.cat([by_batch[(r, i)] for r, i, _ in in_order]))
    # 14 trainable tokens, ceil(0.5 * 14) = 7 important, none of them a non-trainable position.
    assert int(got.sum()) == 7
    trainable = torch.cat([mb["loss_mask"] for _, _, mb in in_order])
    assert not (got & ~trainable).any()
    # Every token scoring above the cut is in, every token below is out; ties at the cut split by key.
    scores = torch.cat([mb["scores"] for _, _, mb in in_order])[trainable]
    cut = scores[got[trainable]].min()
    assert bool((scores[~got[trainable]] <= cut).all()) and bool((scores > cut).sum() <= 7)
