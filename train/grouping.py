"""Token groups in training: the batch scope across micro-batches and ranks, and the collectives.

The grouping rule itself (scopes, tie-break, :func:`important_mask_sequence`,
:func:`important_mask_packed`) is in data/grouping.py, shared with the token viewer; it is
re-exported here for the trainer's modules. :func:`batch_important_masks` ranks every micro-batch
of one optimizer step on every data-parallel rank (Rho-1's scope ``batch``), ties broken by
(rank, micro-batch, position).

The small collective helpers here (:func:`all_reduce_sum`, :func:`gather_values`,
:func:`distributed_top_mask`) are shared with ``train/losses.py``; they fall back to local
computation when torch.distributed is not initialized.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from data.grouping import SCOPES, check_rho, important_mask_packed, important_mask_sequence, top_mask
from schemas.shard import ceil_count

__all__ = [  # the rule's names stay importable from here, where the trainer's modules import them
    "SCOPES", "top_mask", "important_mask_sequence", "important_mask_packed",
    "batch_important_masks", "is_distributed", "all_reduce_sum", "gather_values", "distributed_top_mask",
]


def batch_important_masks(
    scores_list: Sequence[Tensor],
    loss_mask_list: Sequence[Tensor],
    rho: float,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor]:
    """Scope ``batch``: one ranking over all micro-batches of an optimizer step on all ranks.

    Each rank passes its own micro-batches of the step; the trainable scores are all-gathered (no
    gradient) when torch.distributed is initialized, the top ``ceil((1 - rho) * N_global)`` are
    important, and each rank gets back the masks of its own micro-batches. Ties are broken by
    (rank, micro-batch, position): the result equals :func:`important_mask_sequence` on the
    concatenation rank 0's micro-batches, then rank 1's, and so on. Single-process it ranks the
    given micro-batches alone. Every rank must call it (a collective), even with no tokens.

    Returns:
        one bool mask per micro-batch, shaped like its ``loss_mask``.
    """
    check_rho(rho)
    if len(scores_list) != len(loss_mask_list):
        raise ValueError("scores_list and loss_mask_list differ in length")
    flat_masks = [mask.reshape(-1).bool() for mask in loss_mask_list]
    local_scores = []
    for scores, mask, flat_mask in zip(scores_list, loss_mask_list, flat_masks):
        if scores.shape != mask.shape:
            raise ValueError(f"scores {tuple(scores.shape)} and loss_mask {tuple(mask.shape)} differ in shape")
        local_scores.append(scores.reshape(-1)[flat_mask].detach().double())
    device = flat_masks[0].device if flat_masks else torch.device("cpu")
    local = torch.cat(local_scores) if local_scores else torch.zeros(0, dtype=torch.float64, device=device)
    local_important = distributed_top_mask(local, rho, group)

    masks, start = [], 0
    for mask, flat_mask in zip(loss_mask_list, flat_masks):
        count = int(flat_mask.sum())
        important = torch.zeros_like(flat_mask)
        important[flat_mask] = local_important[start : start + count]
        masks.append(important.reshape(mask.shape))
        start += count
    return masks


# ---------------------------------------------------------------------------------------------
# Collectives (no gradient); local fallbacks when torch.distributed is not initialized
# ---------------------------------------------------------------------------------------------


def is_distributed() -> bool:
    """True when torch.distributed is initialized (collectives are then required on every rank)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of a detached tensor over ranks (a copy; the input itself is left as is)."""
    total = values.detach().clone()
    if is_distributed():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def gather_values(values: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """All ranks' 1-D ``values`` concatenated in rank order, and this rank's offset in it.

    Sizes may differ between ranks (and be zero): sizes are gathered first, values padded to the
    largest, then trimmed. No gradient.
    """
    values = values.detach().reshape(-1)
    if not is_distributed():
        return values, 0
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    size = torch.tensor([values.numel()], dtype=torch.int64, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    if max(counts) == 0:  # every rank agrees on this, so all skip the second collective together
        return values, 0
    padded = torch.zeros(max(counts), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    everything = torch.cat([part[:count] for part, count in zip(gathered, counts)])
    return everything, sum(counts[:rank])


def distributed_top_mask(values: Tensor, rho: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """This rank's part of the global top ``ceil((1 - rho) * N_global)`` of ``values`` over all ranks.

    ``values`` are this rank's entries (1-D); ties are broken by (rank, local index). Every rank
    must call it. Single-process it is ``top_mask(values, ceil((1 - rho) * n))``.
    """
    check_rho(rho)
    local = values.detach().reshape(-1).double()
    everything, offset = gather_values(local, group)
    important = top_mask(everything, ceil_count(1.0 - rho, everything.numel()))
    return important[offset : offset + local.numel()]
