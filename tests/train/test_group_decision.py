"""``loss.group_decision=step``: the trainer's gradient does not depend on how the step is split.

The same 4 packed micro-batches of a tiny random Llama (gradient checkpointing on, as the configs
use) are trained through train/main.py's own ``train_step`` (``group_masks``, the look-ahead,
``loss_fn.decide``, ``run_micro_batch``, ``token_losses``, the losses) three ways:

- ``accum4``: one rank, grad_accum 4 (the 4 micro-batches);
- ``single``: one rank, grad_accum 1, one micro-batch packing all 4 (their examples back to back);
- ``ranks2``: two gloo ranks, grad_accum 2 (rank 0 micro-batches 0-1, rank 1 micro-batches 2-3).

The engine is a stand-in for DeepSpeed's with the same arithmetic: ``backward`` divides by
grad_accum and the ranks' gradients are averaged (all-reduce / world size), as DeepSpeed does;
``run_micro_batch`` scales the loss by world size x grad_accum to undo both. The summed gradient must
be the same in all three, to 1e-5, for sftgo, rho1, select and weighted. With
``group_decision=micro_batch`` sftgo, rho1 and select give another gradient under accumulation
(so the test can tell the modes apart).
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VOCAB = 256
LOSSES = {"sftgo": ["loss.lambda=0.9"], "rho1": ["loss.rho1_rho=0.4"], "select": [], "weighted": ["loss.weight_transform=rank"]}
MODES = ("step", "micro_batch")


class LocalEngine:
    """What train_step and run_micro_batch use of a DeepSpeed engine, with DeepSpeed's gradient arithmetic:
    gradients accumulate over micro-batches divided by grad_accum; no optimizer step, no clipping."""

    def __init__(self, module: torch.nn.Module, grad_accum: int) -> None:
        self.module, self.grad_accum, self.optimizer = module, grad_accum, None

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return False

    def step(self) -> None:
        pass

    def bfloat16_enabled(self) -> bool:
        return False

    def zero_optimization_stage(self) -> int:
        return 0


def make_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model.train()


def make_micro_batches() -> list[dict[str, object]]:
    """4 packed micro-batches of 2-3 examples each: a prompt, then trainable tokens; scores and ref losses."""
    generator = torch.Generator().manual_seed(3)
    micro = []
    count = 0
    for n_examples in (2, 3, 2, 3):
        lengths = torch.randint(8, 20, (n_examples,), generator=generator).tolist()
        masks = []
        for length in lengths:
            prompt = int(torch.randint(2, 5, (1,), generator=generator))
            masks.append(torch.arange(length) >= prompt)
        total = sum(lengths)
        micro.append({
            "input_ids": torch.randint(3, VOCAB, (total,), generator=generator),
            "position_ids": torch.cat([torch.arange(n) for n in lengths]),
            "seq_lens": lengths,
            "loss_mask": torch.cat(masks),
            "score": torch.rand(total, generator=generator) * 5,
            # around the model's initial CE (~log 256 = 5.5), so the live excess has both signs
            "ref_loss": 4.5 + 2 * torch.rand(total, generator=generator),
            "ids": [f"ex-{count + i}" for i in range(n_examples)],  # the grouping's tie keys hash them
        })
        count += n_examples
    return micro


def packed(micro: list[dict[str, object]]) -> dict[str, object]:
    """The micro-batches' examples back to back in one micro-batch."""
    out = {key: torch.cat([b[key] for b in micro]) for key in ("input_ids", "position_ids", "loss_mask", "score", "ref_loss")}
    out["seq_lens"] = [n for b in micro for n in b["seq_lens"]]
    out["ids"] = [i for b in micro for i in b["ids"]]
    return out


def step_gradients(name: str, mode: str, micro: list[dict[str, object]]) -> tuple[list[torch.Tensor], list[dict[str, float]]]:
    """train_step on ``micro`` (this rank's share); the gradient summed over ranks, and the parts' metrics."""
    from train import config as train_config
    from train.losses import build_loss
    from train.step import Batch, train_step

    cfg = train_config.load_config([f"loss.name={name}", f"loss.group_decision={mode}", f"train.grad_accum={len(micro)}",
                                    "importance.rho=0.7", "importance.scope=sequence", "train.ce_chunk=16",
                                    "data.micro_batch_tokens=64", "data.train=unused", *LOSSES[name]])
    train_config.validate(cfg)
    model = make_model()
    engine = LocalEngine(model, cfg.train.grad_accum)
    loss_fn = build_loss(cfg.loss.name, **train_config.loss_options(cfg))
    batches = [Batch.of(dict(b, ref_loss=b["ref_loss"] if loss_fn.needs_ref_loss else None)) for b in micro]
    parts, _, _ = train_step(engine, batches, loss_fn, cfg, None, 0.0, torch.device("cpu"))
    grads = []
    for p in model.parameters():
        grad = p.grad.detach().clone()
        dist.all_reduce(grad)
        grads.append(grad / dist.get_world_size())  # DeepSpeed averages over ranks
    return grads, parts


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        micro = make_micro_batches()
        results = {}
        for name in LOSSES:
            for mode in MODES:
                if world == 2:
                    results[("ranks2", name, mode)] = step_gradients(name, mode, micro[2 * rank:2 * rank + 2])
                else:
                    results[("accum4", name, mode)] = step_gradients(name, mode, micro)
                    results[("single", name, mode)] = step_gradients(name, mode, [packed(micro)])
        torch.save(results, Path(out_dir) / f"world{world}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[tuple[str, str, str], tuple[list[torch.Tensor], list[dict[str, float]]]]:
    out_dir = tmp_path_factory.mktemp("group_decision")
    for world in (1, 2):
        mp.spawn(_worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=True)
    merged = torch.load(out_dir / "world1_rank0.pt")
    rank0, rank1 = (torch.load(out_dir / f"world2_rank{r}.pt") for r in range(2))
    for key, (grads, parts) in rank0.items():  # the all-reduced gradient is the same on both ranks
        assert all(torch.equal(a, b) for a, b in zip(grads, rank1[key][0]))
        merged[key] = (grads, parts + rank1[key][1])
    return merged


def max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(LOSSES))
def test_step_decision_gradient_does_not_depend_on_the_split(results, name):
    single, _ = results[("single", name, "step")]
    assert max(float(g.abs().max()) for g in single) > 1e-2  # a real gradient, not zeros
    for split in ("accum4", "ranks2"):
        grads, _ = results[(split, name, "step")]
        assert max_difference(grads, single) < 1e-5, (split, max_difference(grads, single))
    # One micro-batch per step: both modes are the same computation.
    assert max_difference(results[("single", name, "micro_batch")][0], single) < 1e-7


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["sftgo", "rho1", "select"])
def test_micro_batch_decision_depends_on_the_split(results, name):
    single, _ = results[("single", name, "step")]
    for split in ("accum4", "ranks2"):
        grads, _ = results[(split, name, "micro_batch")]
        assert max_difference(grads, single) > 1e-4, (split, name)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["sftgo", "rho1"])
def test_every_micro_batch_logs_the_steps_groups(results, name):
    """The step's worse group, group losses and CE in every micro-batch's metrics (so in the step's log line)."""
    _, (expected,) = results[("single", name, "step")]
    for split in ("accum4", "ranks2"):
        _, parts = results[(split, name, "step")]
        for part in parts:
            for key in ("worse_group", "important_loss", "unimportant_loss", "ce", "important_fraction"):
                assert part[key] == pytest.approx(expected[key], abs=1e-5), (split, key)
    if name == "sftgo":  # under micro_batch the micro-batches of this data disagree on the worse group
        parts = results[("accum4", name, "micro_batch")][1]
        assert len({p["worse_group"] for p in parts}) == 2
