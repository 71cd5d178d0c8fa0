"""Per-token losses from a causal LM's logits: the one rule shared by the trainer (train/forward.py),
train.evaluate's loglikelihoods (train/packed_lm.py) and annotate's base_loss / ref_loss scorers, so
a stored score is exactly the loss the trainer computes.

The rule: logits are upcast to at least fp32 (never downcast: an fp64 model stays fp64), then the
model's final-logit soft-capping is applied when its config has one (Gemma-2:
``tanh(logits / cap) * cap``), then log-softmax / cross-entropy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def logit_softcap(model: Any) -> float | None:
    """The model's ``final_logit_softcapping`` (None or 0 for models without one, e.g. Llama)."""
    return getattr(getattr(model, "config", None), "final_logit_softcapping", None) or None


def final_logits(logits: Tensor, softcap: float | None) -> Tensor:
    """``logits`` as the model's output distribution sees them: upcast to >= fp32, soft-capped if the model does."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def token_ce(logits: Tensor, labels: Tensor, softcap: float | None) -> Tensor:
    """Per-row cross-entropy ``-log p(labels[i])`` of ``logits[i]`` ([N, V] -> [N], >= fp32)."""
    return F.cross_entropy(final_logits(logits, softcap), labels, reduction="none")


def token_logprobs(logits: Tensor, softcap: float | None) -> Tensor:
    """Log-probabilities over the vocabulary ([..., V], >= fp32), as :func:`token_ce` scores them."""
    return F.log_softmax(final_logits(logits, softcap), dim=-1)
