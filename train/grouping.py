"""Token groups in training: the batch scope across micro-batches and ranks, and the collectives.

The grouping rule itself (scopes, tie keys, :func:`important_masks`, :func:`corpus_cut`) is in
data/grouping.py, shared with the token viewer and the TRL bridge; it is re-exported here for the
trainer's modules. What training adds is the batch scope's ranking across data-parallel ranks
(:func:`across_ranks`): every micro-batch of one optimizer step on every rank is ranked together
(Rho-1's scope ``batch``), ties broken by the tie keys of (example id, position), so the groups do
not depend on how the step is split into micro-batches and ranks. :func:`step_important_masks` is
the trainer's and the held-out evaluation's one call; :func:`batch_important_masks` its batch scope
on bare tensors.

The small collective helpers here (:func:`all_reduce_sum`, :func:`gather_values`,
:func:`distributed_top_mask`) are shared with ``train/losses.py``; they fall back to local
computation when torch.distributed is not initialized. Each moves its tensors to the device the
process group's backend takes (:func:`collective_device`: CUDA for NCCL, CPU for gloo) and returns
its result on the caller's device, so CPU score and mask tensors work on an NCCL group.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from data.grouping import (
    SCOPES,
    CorpusCut,
    check_rho,
    corpus_cut,
    important_mask_packed,
    important_mask_sequence,
    important_masks,
    manifest_corpus_cut,
    tie_keys,
    top_mask,
)
from schemas.shard import ceil_count

__all__ = [  # the rule's names stay importable from here, where the trainer's modules import them
    "SCOPES", "CorpusCut", "check_rho", "corpus_cut", "manifest_corpus_cut", "tie_keys", "top_mask", "important_mask_sequence",
    "important_mask_packed", "important_masks", "batch_important_masks", "step_important_masks", "across_ranks", "is_distributed", "collective_device", "all_reduce_sum",
    "gather_values", "distributed_top_mask",
]


def step_important_masks(step: Sequence[Any], rho: float, scope: str,
                         threshold: float | CorpusCut | None = None,
                         group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Important-token masks of one optimizer step's micro-batches (this rank's), at ``rho`` in ``scope``:
    :func:`data.grouping.important_masks` with the batch scope ranked across ranks (:func:`across_ranks`).

    Each micro-batch is a ``train.step.Batch`` (its ``score``, ``loss_mask``, ``seq_lens``, ``ids``).
    ``batch``: one ranking over every micro-batch on every rank (a collective: every rank calls it);
    ``sequence`` / ``corpus``: each micro-batch on its own (``threshold`` = the corpus cut,
    :func:`manifest_corpus_cut`). Masks are shaped like each ``loss_mask``, on its device (the
    trainer's CPU batches: CPU, whatever device the collective ran on).
    """
    return important_masks([b.score for b in step], [b.loss_mask for b in step], rho, scope, threshold,
                           seq_lens=[b.seq_lens for b in step], ids=[b.ids for b in step], rank=across_ranks(group))


def across_ranks(group: dist.ProcessGroup | None = None) -> Callable[[Tensor, float, Tensor], Tensor]:
    """The batch scope's ranking over every rank's trainable tokens (:func:`distributed_top_mask`), as
    :func:`data.grouping.important_masks` takes it."""
    return lambda values, rho, keys: distributed_top_mask(values, rho, group, keys=keys)


def batch_important_masks(
    scores_list: Sequence[Tensor],
    loss_mask_list: Sequence[Tensor],
    rho: float,
    group: dist.ProcessGroup | None = None,
    ids_list: Sequence[Sequence[str] | None] | None = None,
    seq_lens_list: Sequence[Sequence[int]] | None = None,
) -> list[Tensor]:
    """Scope ``batch``: one ranking over all micro-batches of an optimizer step on all ranks.

    Each rank passes its own micro-batches of the step; the trainable scores and their tie keys are
    all-gathered (no gradient) when torch.distributed is initialized, the top
    ``ceil((1 - rho) * N_global)`` are important, and each rank gets back the masks of its own
    micro-batches. Ties are broken by the tie keys of (example id, position) (data/grouping.py),
    which do not depend on the rank or micro-batch a token lands in. Single-process it ranks the
    given micro-batches alone. Every rank must call it (a collective), even with no tokens.

    Args:
        ids_list, seq_lens_list: per micro-batch, its examples' ids and lengths (the batch's ``ids``
            and ``seq_lens``). Without them a micro-batch is one example with the empty id.

    Returns:
        one bool mask per micro-batch, shaped like its ``loss_mask``, on its device.
    """
    if len(scores_list) != len(loss_mask_list):
        raise ValueError("scores_list and loss_mask_list differ in length")
    for given in (ids_list, seq_lens_list):
        if given is not None and len(given) != len(scores_list):
            raise ValueError("ids_list and seq_lens_list need one entry per micro-batch")
    return important_masks(scores_list, loss_mask_list, rho, "batch", seq_lens=seq_lens_list, ids=ids_list,
                           rank=across_ranks(group))


# ---------------------------------------------------------------------------------------------
# Collectives (no gradient); local fallbacks when torch.distributed is not initialized
# ---------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when torch.distributed is initialized (collectives are then required on every rank)."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device a collective on ``group`` takes its tensors on.

    NCCL takes CUDA tensors only (a CPU tensor fails: "No backend type associated with device type
    cpu"), gloo takes CPU tensors; a group with one backend per device type
    (``"cpu:gloo,cuda:nccl"``) takes CPU tensors through its CPU entry. CUDA means the current
    device, the one the rank bound (``torch.cuda.set_device``). Not distributed: the CPU.
    """
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl": device type -> backend
        device_types = {entry.split(":", 1)[0].strip() for entry in backend.split(",")}
        if "cpu" in device_types:
            return torch.device("cpu")
        backend = "nccl" if "cuda" in device_types else backend
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "xccl":
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of a detached tensor over ranks (a copy on the input's device; the input is left as is)."""
    total = values.detach().clone()
    if is_distributed():
        on_backend = total.to(collective_device(group))
        dist.all_reduce(on_backend, op=dist.ReduceOp.SUM, group=group)
        total = on_backend.to(values.device)
    return total


def gather_values(values: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """All ranks' 1-D ``values`` concatenated in rank order (on ``values``' device), and this rank's
    offset in it.

    Sizes may differ between ranks (and be zero): sizes are gathered first, values padded to the
    largest, then trimmed. The collectives run on :func:`collective_device`. No gradient.
    """
    values = values.detach().reshape(-1)
    if not is_distributed():
        return values, 0
    device = collective_device(group)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:  # every rank agrees on this, so all skip the second collective together
        return values, 0
    padded = torch.zeros(max(counts), dtype=values.dtype, device=device)
    padded[: values.numel()] = values.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    everything = torch.cat([part[:count] for part, count in zip(gathered, counts)])
    return everything.to(values.device), sum(counts[:rank])


def distributed_top_mask(values: Tensor, rho: float, group: dist.ProcessGroup | None = None,
                         keys: Tensor | None = None) -> Tensor:
    """This rank's part of the global top ``ceil((1 - rho) * N_global)`` of ``values`` over all ranks.

    ``values`` are this rank's entries (1-D). Ties are broken by the smaller ``keys`` entry (tie keys,
    gathered with the values in the same collective), else by (rank, local index). Every rank must
    call it, all with keys or all without. Single-process it is
    ``top_mask(values, ceil((1 - rho) * n), keys)``. The mask is on ``values``' device.
    """
    check_rho(rho)
    local = values.detach().reshape(-1).double()
    if keys is None:
        everything, offset = gather_values(local, group)
        important = top_mask(everything, ceil_count(1.0 - rho, everything.numel()))
        return important[offset : offset + local.numel()]
    keys = keys.detach().reshape(-1).double().to(local.device)
    if keys.shape != local.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(local.shape)} differ in shape")
    # One gather of (value, key) pairs: interleaved, so offsets count pairs twice.
    pairs, offset = gather_values(torch.stack([local, keys], dim=1).reshape(-1), group)
    pairs = pairs.reshape(-1, 2)
    important = top_mask(pairs[:, 0], ceil_count(1.0 - rho, pairs.shape[0]), pairs[:, 1])
    start = offset // 2
    return important[start : start + local.numel()]
