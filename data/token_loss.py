"""Per-token losses from a causal LM's logits: the one rule shared by the trainer (train/forward.py),
evaluation.run's loglikelihoods (evaluation/packed_lm.py) and annotate's base_loss / ref_loss scorers, so
a stored score is exactly the loss the trainer computes.

The callers run the model's backbone and ``lm_head`` themselves (to chunk the vocabulary-sized
logits), which skips whatever the model's own ``forward`` does to the logits after ``lm_head``. The
rule: logits are upcast to at least fp32 (never downcast: an fp64 model stays fp64), then the model's
own final-logit transform (:func:`logit_transform`: Granite's ``/ logits_scaling``, Cohere's
``* logit_scale``, Gemma-2/3's soft-cap ``tanh(logits / cap) * cap``, ...) is applied, then
log-softmax / cross-entropy. A model whose config announces a final-logit transform this module does
not know is refused (ValueError) rather than scored with the wrong distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LogitTransform:
    """What a model's forward does to ``lm_head``'s output, in this order: ``* multiply``,
    ``/ divide``, then soft-cap ``tanh(x / softcap) * softcap``. None = that step is absent."""

    multiply: float | None = None
    divide: float | None = None
    softcap: float | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitTransform()


def _softcap(config: Any) -> LogitTransform:
    return LogitTransform(softcap=getattr(config, "final_logit_softcapping", None) or None)


def _softcap_always(config: Any) -> LogitTransform:
    cap = getattr(config, "final_logit_softcapping", None)
    if not cap:  # the forward divides by it unconditionally
        raise ValueError(f"{config.model_type}: config.final_logit_softcapping is {cap!r}; its forward needs a value")
    return LogitTransform(softcap=cap)


def _divide(attribute: str) -> Any:
    return lambda config: LogitTransform(divide=float(getattr(config, attribute)))


def _multiply(attribute: str) -> Any:
    def transform(config: Any) -> LogitTransform:
        value = getattr(config, attribute, None)
        return LogitTransform(multiply=None if value is None else float(value))

    return transform


#: config.model_type -> the final-logit transform of its ``*ForCausalLM.forward`` (transformers 5.x
#: modeling files, read line by line). Hidden-state divisions before a bias-free ``lm_head``
#: (MiniCPM3) are the same division of the logits.
KNOWN_TRANSFORMS: dict[str, Any] = {
    # logits = logits / config.logits_scaling  ("main diff with Llama")
    **{name: _divide("logits_scaling") for name in (
        "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")},
    # hidden_states / config.logits_scaling, then lm_head (no bias)
    "minicpm3": _divide("logits_scaling"),
    # logits = logits * self.logit_scale, self.logit_scale = config.logit_scale
    **{name: _multiply("logit_scale") for name in ("cohere", "cohere2", "cohere2_moe")},
    # MuP: logits = lm_head(h) * config.logits_scaling (multiplies, unlike Granite)
    "hyperclovax": _multiply("logits_scaling"),
    # logits = lm_head(h) * self.model.lm_head_multiplier (= config.lm_head_multiplier)
    "falcon_h1": _multiply("lm_head_multiplier"),
    # if config.final_logit_softcapping is not None: tanh(logits / cap) * cap
    **{name: _softcap for name in (
        "gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4_text", "vaultgemma", "nanochat", "beam")},
    # soft-capped unconditionally
    "mistral_large4_text": _softcap_always,
}

#: Config attributes that, with a value other than these neutral ones, mean a final-logit transform:
#: a model type outside KNOWN_TRANSFORMS carrying one is refused.
TRANSFORM_ATTRIBUTES = ("logits_scaling", "logit_scale", "final_logit_softcapping", "output_multiplier",
                        "lm_head_multiplier", "logits_mup_width_multiplier", "output_logit_soft_cap", "logit_softcapping")
_NEUTRAL = (None, 0, 0.0, 1, 1.0, False)


def logit_transform(model: Any) -> LogitTransform:
    """The final-logit transform of ``model`` (a ``*ForCausalLM``, or anything with a ``config``).

    Known model types (:data:`KNOWN_TRANSFORMS`) get theirs; any other model is the identity unless its
    (text) config sets one of :data:`TRANSFORM_ATTRIBUTES` to a non-neutral value, in which case its
    forward presumably transforms the logits in a way not known here: ValueError, so that no loss is
    computed from the wrong distribution. (A family whose transform hides under another attribute
    name is not caught by this; :func:`check_logit_transform` compares with the model's own logits.)
    """
    config = getattr(model, "config", None)
    if config is None:
        return IDENTITY
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type in KNOWN_TRANSFORMS:
        return KNOWN_TRANSFORMS[model_type](config)
    unknown = {name: getattr(config, name) for name in TRANSFORM_ATTRIBUTES
               if not _is_neutral(getattr(config, name, None))}
    if unknown:
        settings = ", ".join(f"config.{name} = {value!r}" for name, value in unknown.items())
        raise ValueError(f"model type {model_type!r} sets {settings}: a final-logit transform sftgo does not know, so "
                         "its per-token losses would not be the model's; add it to data/token_loss.py KNOWN_TRANSFORMS")
    return IDENTITY


def _is_neutral(value: Any) -> bool:
    try:
        return value in _NEUTRAL
    except Exception:  # noqa: BLE001 - e.g. a tensor-valued attribute: not neutral
        return False


def logit_softcap(model: Any) -> LogitTransform:
    """Deprecated name of :func:`logit_transform` (it returns the whole transform, soft-cap included)."""
    return logit_transform(model)


def final_logits(logits: Tensor, transform: LogitTransform | float | None) -> Tensor:
    """``logits`` as the model's output distribution sees them: upcast to >= fp32, then the model's
    final-logit transform (a bare float is a soft-cap, None nothing)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if isinstance(transform, LogitTransform):
        return transform(logits)
    if transform:
        logits = torch.tanh(logits / transform) * transform
    return logits


def token_ce(logits: Tensor, labels: Tensor, transform: LogitTransform | float | None) -> Tensor:
    """Per-row cross-entropy ``-log p(labels[i])`` of ``logits[i]`` ([N, V] -> [N], >= fp32)."""
    return F.cross_entropy(final_logits(logits, transform), labels, reduction="none")


def token_logprobs(logits: Tensor, transform: LogitTransform | float | None) -> Tensor:
    """Log-probabilities over the vocabulary ([..., V], >= fp32), as :func:`token_ce` scores them."""
    return F.log_softmax(final_logits(logits, transform), dim=-1)


def top_k_entropy(logits: Tensor, k: int, transform: LogitTransform | float | None) -> Tensor:
    """Normalised entropy of each row's top-k distribution, without gradient ([N, V] -> [N], >= fp32, in [0, 1]).

    The ``min(k, V)`` largest logits (after :func:`final_logits`, the model's own distribution) are
    renormalised by a softmax over themselves; their entropy ``-sum p log p`` is divided by
    ``log(min(k, V))``, its value for a uniform top-k. EAFT's token weight (train/losses.py ``EaftLoss``).
    """
    if k < 2:
        raise ValueError(f"top-k entropy needs k >= 2 (log k normalises it), got {k}")
    with torch.no_grad():
        top = final_logits(logits.detach(), transform).topk(min(k, logits.shape[-1]), dim=-1).values
        if top.shape[-1] < 2:  # a one-word vocabulary: nothing to be uncertain about
            return torch.zeros(top.shape[:-1], dtype=top.dtype, device=top.device)
        logp = F.log_softmax(top, dim=-1)
        return -(logp.exp() * logp).sum(-1) / math.log(top.shape[-1])


def check_logit_transform(model: Any, input_ids: Tensor, atol: float = 1e-4) -> float:
    """Largest |difference| between the model's own log-probabilities (``model(input_ids).logits``) and
    this module's (backbone + ``lm_head`` + :func:`logit_transform`) on ``input_ids`` ``[1, T]``;
    ValueError above ``atol``. One short forward: a start-up check for a model family not listed."""
    with torch.no_grad():
        own = F.log_softmax(model(input_ids=input_ids).logits.double(), dim=-1)
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        ours = token_logprobs(model.get_output_embeddings()(hidden), logit_transform(model)).double()
    difference = float((own - ours).abs().max())
    if difference > atol:
        raise ValueError(f"the model's own log-probabilities differ from sftgo's by {difference:.3g} (> {atol:g}): its "
                         "forward transforms the logits in a way data/token_loss.py does not know")
    return difference
