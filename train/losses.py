"""Token-level SFT objectives (METHOD.md "Losses"), one small class each, chosen by name.

Every loss is a callable with one interface; the trainer calls it once per micro-batch::

    contribution, metrics = loss_fn(token_loss, important, ref_loss, step_tokens, progress)

- ``token_loss``: ``[n]`` fp32 per-token cross-entropy ``l_t`` of THIS rank's trainable tokens in
  this micro-batch (``reduction="none"``, selected by ``loss_mask``), with gradient.
- ``important``: ``[n]`` bool, the load-time group of each of those tokens (1 = important).
- ``ref_loss``: ``[n]`` stored reference-model CE of the same tokens, or None (only rho1 needs it).
- ``step_tokens``: trainable tokens of the whole optimizer step (all micro-batches, all ranks),
  counted by the trainer before the step.
- ``progress``: ``step / total_steps`` in [0, 1] (lambda decay).

The returned scalar is this rank's exact contribution: summed over ranks and over the micro-batches
of the step it is METHOD.md's loss on the global batch, and so is its gradient. The trainer only
undoes DeepSpeed's gradient averaging (multiplies by the world size).

Group means are means over ALL ranks: per-group loss sums and token counts are all-reduced (no
gradient), so every rank takes the same decisions. Where the data-dependent choices (SFT-GO's worse
group, Rho-1's top set, select's important count) are made is ``loss.group_decision``:

- ``step`` (METHOD.md "Distributed correctness"): over the whole optimizer step, every micro-batch
  on every rank, before any of its micro-batches' losses. The trainer calls
  ``loss_fn.decide(important, token_losses, ref_losses)`` once per step with every micro-batch's
  inputs (``token_losses``: the step's live per-token losses from a no-grad look-ahead forward, for
  the losses with ``needs_lookahead``; select's count needs only the masks) and passes each
  micro-batch its :class:`StepDecision` (``decision=``). The objective is then the global-batch
  formula exactly, however the step is split into micro-batches and ranks.
- ``micro_batch``: per micro-batch; micro-batch m's group term is weighted by ``w_m = N_m / step_tokens``
  (N_m: its trainable tokens over all ranks). One micro-batch per step: the global-batch formula;
  with several, the token-weighted mean of per-micro-batch group losses, which depends on the split
  (``sum_m N_m / N * max_g L_g,m >= max_g L_g``). No look-ahead forward.

A loss with ``entropy_top_k`` (eaft) also takes ``entropy=``: the live model's normalised top-k entropy of the
same tokens, detached, from the forward that computed ``token_loss``.

A loss with ``decides_per_step`` (sftgo, rho1, select) also takes ``decision=`` (a :class:`StepDecision`
from its ``decide``); the others take none (``weighted`` is exact over the step by construction: the
trainer all-reduces the step's weight sum before the step).

Every call is a collective when torch.distributed is initialized: every rank must call the loss for
every micro-batch, even with no trainable tokens.

Metrics (python floats, the same keys for every loss):
    loss: this rank's contribution (sum over ranks and micro-batches = the step's loss);
    ce: mean CE over the micro-batch's tokens on all ranks (with a look-ahead step decision, sftgo and
        rho1 report the step's ce, group losses, worse group and important fraction instead, so the
        trainer's token-weighted mean over micro-batches is the step's value);
    important_loss / unimportant_loss: mean CE of each group over the same tokens, 0.0 for an empty
        group (no NaN in logs); for rho1 the "important" group is the live top-k selection;
    worse_group: 1.0 if the important group has the larger mean (ties and an empty unimportant
        group count as important), else 0.0; the group SFT-GO trains;
    lambda: weight on the group term: sftgo's lambda, 1.0 for rho1 and select, 0.0 for sft/infosft/dft/eaft;
    important_fraction: important tokens / tokens in the micro-batch (0.0 when it has none);
    tokens: trainable tokens of the micro-batch over all ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from data.config import option
from train.grouping import all_reduce_sum, check_rho, distributed_top_mask


LOSSES: dict[str, type[Loss]] = {}
# loss.group_decision: where SFT-GO's worse group, Rho-1's top set and select's count are decided.
GROUP_DECISIONS = ("step", "micro_batch")


def register(cls: type[Loss]) -> type[Loss]:
    """Class decorator: make a loss available under ``cls.name`` (config ``loss.name``)."""
    if cls.name in LOSSES and LOSSES[cls.name] is not cls:
        raise ValueError(f"two losses named {cls.name!r}: {LOSSES[cls.name]} and {cls}")
    LOSSES[cls.name] = cls
    return cls


@dataclass
class NoOptions:
    """A loss without options."""

    def problems(self, as_key: bool = False) -> list[str]:
        return []


class Loss:
    """What every registered loss declares; the trainer calls an instance once per micro-batch::

        contribution, metrics = loss_fn(token_loss, important, ref_loss, step_tokens, progress)

    ``Options`` is a dataclass of the loss's settings (``self.options``): its field names are the constructor's keywords,
    each field's ``key`` its config key (``loss.<key>``; train.config's ``LossConfig`` has one line per
    option, ``loss_option(TheOptions, "field")``, taking default and help from here; a test fails until
    a new option has its line). ``Options.problems(as_key)`` lists bad values,
    named by config key (``loss.lambda``) or by keyword; the constructor raises on the same list.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_ref_loss: ClassVar[bool] = False  # the trainer must load and pass ref_loss
    needs_groups: ClassVar[bool] = False  # the loss reads `important` (others only log it)
    needs_weights: ClassVar[bool] = False  # the trainer computes token_weights and passes weight / step_weight
    decides_per_step: ClassVar[bool] = False  # group_decision=step: the trainer calls decide() and passes decision=
    needs_lookahead: ClassVar[bool] = False  # decide() needs the step's live per-token losses (a no-grad forward)
    # The top-k of the live entropy the forward returns beside each token's loss, passed as ``entropy=`` (eaft); None: none.
    entropy_top_k: int | None = None

    def __init__(self, group: dist.ProcessGroup | None = None, **options: Any) -> None:
        # TypeError on an unknown option, as any keyword; ValueError listing every bad value.
        self.options = self.Options(**options)
        problems = self.options.problems()
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))
        self.group = group

    @classmethod
    def kwargs(cls, options: Any, importance_rho: float) -> dict[str, Any]:
        """Constructor keywords from the config's options (``importance.rho`` for losses that default to it)."""
        return dataclasses.asdict(options)

    @classmethod
    def config_problems(cls, options: Any, importance_scope: str) -> list[str]:
        """Problems of this loss with the rest of the config (only checked when it is the chosen loss)."""
        return []

    @classmethod
    def reads_score(cls) -> bool:
        """Whether the loss reads a stored score: the load-time groups or weights, or ref_loss. One that does not
        (sft, infosft, dft, eaft) trains with ``importance.scorer=none``, on a directory without any score."""
        return cls.needs_groups or cls.needs_weights or cls.needs_ref_loss

    @classmethod
    def label(cls, setting: Callable[[str], Any]) -> str:
        """A run's short label from its saved config (``setting("importance.rho")``), for plot legends."""
        if cls.needs_groups:
            return f"{cls.name}, {setting('importance.scorer')}, rho {setting('importance.rho')}"
        return cls.name

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        raise NotImplementedError

    def decide(self, important: list[Tensor], token_losses: list[Tensor] | None = None,
               ref_losses: list[Tensor | None] | None = None) -> list[StepDecision]:
        """The step's group decision for each of its micro-batches (``loss.group_decision=step``).

        Every argument holds one entry per micro-batch of the step on this rank, over its local
        trainable tokens: ``important`` the load-time groups, ``token_losses`` the live per-token losses
        (detached; required when ``needs_lookahead``), ``ref_losses`` the stored reference losses
        (rho1). A collective when torch.distributed is initialized: every rank calls it once per step.
        """
        raise NotImplementedError(f"{self.name} takes no group decision (decides_per_step is False)")


def _shown(options: Any, name: str, as_key: bool) -> str:
    """An option as a message names it: ``loss.<config key>`` or the constructor keyword."""
    if not as_key:
        return name
    f = next(f for f in dataclasses.fields(options) if f.name == name)
    return "loss." + f.metadata.get("key", name)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@dataclass
class LossInputs:
    """What a loss takes besides the per-token CE, over the same trainable tokens::

        contribution, metrics = loss_fn(token_loss, x.important, x.ref_loss, step_tokens, progress, **x.options)

    ``options``: ``weight`` and ``step_weight`` for a loss with ``needs_weights``; ``decision`` once the
    step's group decision is taken (``loss.group_decision=step``)."""

    important: Tensor
    ref_loss: Tensor | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


def loss_inputs(trainable: Tensor, important: Tensor, ref_loss: Tensor | None = None, weight: Tensor | None = None,
                step_weight: float = 0.0, device: torch.device | str | None = None) -> LossInputs:
    """A loss's inputs from a batch's per-token tensors: the ``trainable`` tokens' groups, reference losses
    and weights (each shaped like ``trainable``; None where the loss takes none), moved to ``device``.

    The one preparation of a loss's inputs: the trainer (train/step.py) and the TRL bridge
    (train/trl_bridge.py) both call it, so what a loss receives cannot drift between them."""

    def pick(values: Tensor) -> Tensor:
        picked = values[trainable]
        return picked if device is None else picked.to(device)

    options = {} if weight is None else {"weight": pick(weight), "step_weight": step_weight}
    return LossInputs(pick(important), None if ref_loss is None else pick(ref_loss), options)


@dataclass(frozen=True)
class GroupStats:
    """Loss sums and token counts of one micro-batch over all ranks (no gradient)."""

    loss_sum: float
    tokens: int
    important_sum: float
    important_tokens: int

    @property
    def unimportant_sum(self) -> float:
        return self.loss_sum - self.important_sum

    @property
    def unimportant_tokens(self) -> int:
        return self.tokens - self.important_tokens

    @property
    def important_mean(self) -> float:
        return self.important_sum / self.important_tokens if self.important_tokens else 0.0

    @property
    def unimportant_mean(self) -> float:
        return self.unimportant_sum / self.unimportant_tokens if self.unimportant_tokens else 0.0

    @property
    def worse_group(self) -> int:
        """1 if the important group's mean is the larger (ties go to it), 0 otherwise.

        An empty group never wins: METHOD.md's max over groups is then the other group.
        """
        if self.unimportant_tokens == 0:
            return 1
        if self.important_tokens == 0:
            return 0
        return 1 if self.important_mean >= self.unimportant_mean else 0


def group_stats(token_loss: Tensor, important: Tensor, group: dist.ProcessGroup | None = None) -> GroupStats:
    """All-reduce (sum over ranks) of the micro-batch's loss sums and counts, in float64."""
    loss = token_loss.detach().double()
    local = torch.stack(
        [
            loss.sum(),
            torch.tensor(float(loss.numel()), dtype=torch.float64, device=loss.device),
            loss[important].sum(),
            important.sum().double(),
        ]
    )
    loss_sum, tokens, important_sum, important_tokens = all_reduce_sum(local, group).tolist()
    return GroupStats(loss_sum, int(round(tokens)), important_sum, int(round(important_tokens)))


@dataclass(frozen=True)
class StepDecision:
    """A group decision over the whole optimizer step (all micro-batches, all ranks), for one micro-batch.

    ``trained_tokens``: tokens of the trained group over the step on all ranks (SFT-GO's worse group,
    Rho-1's top set, select's important group): the group term's denominator. ``worse_group``: 1 when
    the important group (rho1: the live top set) is the trained one. ``selected``: rho1's top set over
    this micro-batch's local trainable tokens. ``stats``: the step's group statistics (None for select,
    which decides from the masks alone).
    """

    trained_tokens: int
    worse_group: int
    selected: Tensor | None = None
    stats: GroupStats | None = None


def _step_stats(token_losses: list[Tensor] | None, groups: list[Tensor], group: dist.ProcessGroup | None) -> GroupStats:
    """:func:`group_stats` over every micro-batch of the step (concatenated in order)."""
    if token_losses is None:
        raise ValueError("this decision needs the step's live token losses (needs_lookahead)")
    if len(token_losses) != len(groups):
        raise ValueError(f"{len(token_losses)} token_losses for {len(groups)} micro-batches")
    return group_stats(_cat([t.detach().double() for t in token_losses]), _cat(groups, torch.bool), group)


def _cat(parts: list[Tensor], dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts]) if parts else torch.zeros(0, dtype=dtype)


def _check_decision(decision: StepDecision, token_loss: Tensor) -> None:
    if decision.selected is not None and decision.selected.shape != token_loss.shape:
        raise ValueError(f"decision.selected {tuple(decision.selected.shape)} does not match token_loss {tuple(token_loss.shape)}")


def _step_metrics(contribution: Tensor, stats: GroupStats, lambda_: float, tokens: int) -> dict[str, float]:
    """The step's group statistics as this micro-batch's metrics; ``tokens`` stays the micro-batch's."""
    return {**_metrics(contribution, stats, lambda_), "tokens": float(tokens)}


def _check_inputs(
    token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float
) -> None:
    if token_loss.dim() != 1:
        raise ValueError(f"token_loss must be 1-D (this rank's trainable tokens), got {tuple(token_loss.shape)}")
    if important.shape != token_loss.shape or important.dtype != torch.bool:
        raise ValueError("important must be a bool tensor shaped like token_loss")
    if ref_loss is not None and ref_loss.shape != token_loss.shape:
        raise ValueError("ref_loss must be shaped like token_loss")
    if step_tokens < token_loss.numel():
        raise ValueError(f"step_tokens={step_tokens} is smaller than this micro-batch's {token_loss.numel()} tokens")
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")


def _per_token_scale(step_tokens: int) -> float:
    # A step without trainable tokens contributes nothing (its token_loss is empty everywhere).
    return 1.0 / step_tokens if step_tokens > 0 else 0.0


def _metrics(contribution: Tensor, stats: GroupStats, lambda_: float) -> dict[str, float]:
    return {
        "loss": float(contribution.detach()),
        "ce": stats.loss_sum / stats.tokens if stats.tokens else 0.0,
        "important_loss": stats.important_mean,
        "unimportant_loss": stats.unimportant_mean,
        "worse_group": float(stats.worse_group),
        "lambda": float(lambda_),
        "important_fraction": stats.important_tokens / stats.tokens if stats.tokens else 0.0,
        "tokens": float(stats.tokens),
    }


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


@register
class SftLoss(Loss):
    """Plain SFT: ``L = sum_t l_t / N`` with N the step's trainable tokens."""

    name = "sft"

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return "CE over every trainable token"

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        stats = group_stats(token_loss, important, self.group)
        contribution = token_loss.sum() * _per_token_scale(step_tokens)
        return contribution, _metrics(contribution, stats, 0.0)


@dataclass
class SftGoOptions:
    lambda_: float = option(0.9, "SFT-GO's weight on max(L_1, L_0) with lambda_schedule static, in [0, 1]", key="lambda")
    lambda_schedule: str = option("static", "static (lambda) | linear (lambda_max -> lambda_min over the training steps)")
    lambda_max: float = option(0.9, "linear schedule: lambda at the first step")
    lambda_min: float = option(0.05, "linear schedule: lambda at the last step")

    def problems(self, as_key: bool = False) -> list[str]:
        name = lambda field: _shown(self, field, as_key)  # noqa: E731
        out = [f"{name(f)}: {v} must be in [0, 1]" for f, v in
               (("lambda_", self.lambda_), ("lambda_max", self.lambda_max), ("lambda_min", self.lambda_min))
               if not (0.0 <= v <= 1.0)]
        if self.lambda_min > self.lambda_max:
            out.append(f"{name('lambda_min')}: {self.lambda_min} must be <= {name('lambda_max')} ({self.lambda_max})")
        if self.lambda_schedule not in SftGoLoss.SCHEDULES:
            out.append(f"{name('lambda_schedule')}: {self.lambda_schedule!r} is not one of {list(SftGoLoss.SCHEDULES)}")
        return out


@register
class SftGoLoss(Loss):
    """SFT-GO: ``L = (1 - lambda) * L_CE + lambda * max(L_1, L_0)``, L_g the mean loss of group g.

    This rank's contribution for micro-batch m::

        (1 - lambda) * sum_local l_t / step_tokens
        + lambda * w_m * sum_{t in worse group, local} l_t / N_{worse, m}

    with ``w_m = N_m / step_tokens``; N_m and N_{worse, m} count tokens on all ranks and the worse
    group (larger mean over all ranks; if one group is empty, the other) is decided per micro-batch
    without gradient. One micro-batch per step: exactly METHOD.md's global-batch loss. With
    gradient accumulation the worse group is chosen per micro-batch and the group term is the
    token-weighted mean of the micro-batches' worse-group losses (``group_decision=micro_batch``).

    With a step decision (``decide``: the group means over the step's look-ahead losses) the group
    term is ``lambda * sum_{t in worse, local} l_t / N_worse`` with the worse group and N_worse of the
    whole step: summed over micro-batches and ranks, exactly ``(1 - lambda) L_CE + lambda max(L_1, L_0)``
    on the global batch.

    Options: lambda_ (static lambda, paper 0.9) with ``lambda_schedule="static"``; ``"linear"`` goes
    from lambda_max at progress 0 to lambda_min at 1 (paper: 0.9 -> 0.07 and 0.9 -> 0.05).
    """

    name = "sftgo"
    Options = SftGoOptions
    needs_groups = True
    decides_per_step = True
    needs_lookahead = True
    SCHEDULES = ("static", "linear")

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        lam = (f"λ = {self.options.lambda_:g} (static)" if self.options.lambda_schedule == "static"
               else f"λ linear {self.options.lambda_max:g} → {self.options.lambda_min:g}")
        return f"(1 − λ)·CE + λ·(worse group's mean loss), {lam}"

    def lambda_at(self, progress: float) -> float:
        """lambda at training progress ``step / total_steps``."""
        if self.options.lambda_schedule == "static":
            return self.options.lambda_
        progress = min(max(progress, 0.0), 1.0)
        return self.options.lambda_max + (self.options.lambda_min - self.options.lambda_max) * progress

    def decide(self, important: list[Tensor], token_losses: list[Tensor] | None = None,
               ref_losses: list[Tensor | None] | None = None) -> list[StepDecision]:
        """The worse group of the whole step from its look-ahead losses (group sums all-reduced)."""
        stats = _step_stats(token_losses, important, self.group)
        worse = stats.worse_group
        decision = StepDecision(stats.important_tokens if worse == 1 else stats.unimportant_tokens, worse, stats=stats)
        return [decision] * len(important)

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float,
        decision: StepDecision | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        stats = group_stats(token_loss, important, self.group)
        lambda_ = self.lambda_at(progress)
        scale = _per_token_scale(step_tokens)
        contribution = (1.0 - lambda_) * scale * token_loss.sum()
        if decision is not None:  # the step's worse group and its size: the global-batch max, exactly
            _check_decision(decision, token_loss)
            if decision.trained_tokens > 0:
                worse_mask = important if decision.worse_group == 1 else ~important
                contribution = contribution + lambda_ / decision.trained_tokens * token_loss[worse_mask].sum()
            return contribution, _step_metrics(contribution, decision.stats or stats, lambda_, stats.tokens)
        worse_group = stats.worse_group
        worse_mask = important if worse_group == 1 else ~important
        worse_tokens = stats.important_tokens if worse_group == 1 else stats.unimportant_tokens
        if worse_tokens > 0:
            # w_m / N_worse = (N_m / step_tokens) / N_worse, one float for every rank.
            contribution = contribution + lambda_ * (stats.tokens * scale / worse_tokens) * token_loss[worse_mask].sum()
        return contribution, _metrics(contribution, stats, lambda_)


@dataclass
class Rho1Options:
    rho: float | None = option(None, "rho1: train the top 1 - rho of tokens by live excess loss; null = importance.rho", key="rho1_rho")

    def problems(self, as_key: bool = False) -> list[str]:
        try:
            if self.rho is not None:
                check_rho(self.rho)
        except ValueError:
            return [f"{_shown(self, 'rho', as_key)}: {self.rho} must be in [0, 1)"]
        return []


@register
class Rho1Loss(Loss):
    """Rho-1 with live excess: train on the top ``ceil((1 - rho) * N_m)`` tokens by excess.

    ``excess_t = l_t (detached, current model) - ref_loss_t``; the selection ranks the micro-batch's
    tokens on all ranks (values all-gathered, no gradient; ties: lower rank, then earlier token).
    Contribution: ``w_m * sum_{t in top, local} l_t / K_m`` with ``w_m = N_m / step_tokens`` and K_m
    the selected count over all ranks. One micro-batch per step: METHOD.md's
    ``sum_{t in top} l_t / |top|`` on the global batch; with accumulation the top set is chosen
    per micro-batch, treated like SFT-GO's worse group (``group_decision=micro_batch``). With a step
    decision (``decide``) the top ``ceil((1 - rho) * N_step)`` of the whole step's look-ahead excess
    over all ranks (all-gathered; ties: rank, micro-batch, position) is selected and the contribution
    is ``sum_{t in top, local} l_t / K_step``: the global-batch formula exactly. ``important`` is not
    used; the metrics report the live selection as the important group.

    Options: rho in [0, 1); the top ``1 - rho`` fraction is trained (Rho-1's k = 60-70%: rho 0.3-0.4).
    """

    name = "rho1"
    Options = Rho1Options
    needs_ref_loss = True
    decides_per_step = True
    needs_lookahead = True

    def __init__(self, rho: float, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group, rho=rho)

    @classmethod
    def kwargs(cls, options: Rho1Options, importance_rho: float) -> dict[str, Any]:
        return {"rho": importance_rho if options.rho is None else options.rho}

    @classmethod
    def label(cls, setting: Callable[[str], Any]) -> str:
        rho = setting("loss.rho1_rho")
        return f"{cls.name}, rho {setting('importance.rho') if rho is None else rho}"

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return f"CE over the top {1 - self.options.rho:.0%} of tokens by excess loss (rho1 rho {self.options.rho:g})"

    def decide(self, important: list[Tensor], token_losses: list[Tensor] | None = None,
               ref_losses: list[Tensor | None] | None = None) -> list[StepDecision]:
        """The top set of the whole step's live excess over all ranks (values all-gathered: exact)."""
        if token_losses is None or ref_losses is None or len(ref_losses) != len(token_losses):
            raise ValueError("rho1's step decision needs the look-ahead token losses and ref_loss of every micro-batch")
        if any(r is None and t.numel() for t, r in zip(token_losses, ref_losses)):
            raise ValueError("rho1 needs ref_loss (annotate with the ref_loss scorer)")
        # A rank out of data pads its step with empty micro-batches, which carry no ref_loss.
        excess = _cat([t.detach().double() - (r.detach().to(device=t.device, dtype=torch.float64) if r is not None else 0.0)
                       for t, r in zip(token_losses, ref_losses)])
        selected = distributed_top_mask(excess, self.options.rho, self.group)
        parts = list(torch.split(selected, [t.numel() for t in token_losses]))
        stats = _step_stats(token_losses, parts, self.group)
        return [StepDecision(stats.important_tokens, 1, selected=part, stats=stats) for part in parts]

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float,
        decision: StepDecision | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        if decision is not None:  # the step's top set, fixed by the look-ahead
            _check_decision(decision, token_loss)
            selected = decision.selected.to(token_loss.device)
            stats = group_stats(token_loss, selected, self.group)
            if decision.trained_tokens > 0:
                contribution = token_loss[selected].sum() / decision.trained_tokens
            else:  # no tokens anywhere in this step; keep the graph for backward
                contribution = token_loss.sum() * 0.0
            return contribution, _step_metrics(contribution, decision.stats or stats, 1.0, stats.tokens)
        if ref_loss is None and token_loss.numel():
            raise ValueError("rho1 needs ref_loss (annotate with the ref_loss scorer)")
        if ref_loss is None:  # an empty micro-batch of a rank out of data: nothing to rank, still a collective
            ref_loss = token_loss.detach()
        excess = token_loss.detach().double() - ref_loss.detach().to(device=token_loss.device, dtype=torch.float64)
        selected = distributed_top_mask(excess, self.options.rho, self.group)
        stats = group_stats(token_loss, selected, self.group)
        selected_tokens = stats.important_tokens
        if selected_tokens > 0:
            weight = stats.tokens * _per_token_scale(step_tokens) / selected_tokens
            contribution = weight * token_loss[selected].sum()
        else:  # no tokens anywhere in this micro-batch; keep the graph for backward
            contribution = token_loss.sum() * 0.0
        return contribution, _metrics(contribution, stats, 1.0)


@dataclass
class InfoSftOptions:
    p: float = option(0.93, "InfoSFT: confidence above which a token gets no weight, in (0.5, 1)", key="infosft_p")

    def problems(self, as_key: bool = False) -> list[str]:
        if not 0.5 < self.p < 1.0:
            return [f"{_shown(self, 'p', as_key)}: {self.p} must be in (0.5, 1) so that logit(p) > 0"]
        return []


@register
class InfoSftLoss(Loss):
    """InfoSFT: ``L = sum_t w_t l_t / N``, ``w_t = sg(q_t * max(0, 1 - logit(q_t) / logit(P)))``.

    ``q_t = exp(-l_t)``. logit(q) is computed as ``-l_t - log1p(-q_t)`` so it stays finite for
    q -> 0 without clamping (log q = -l exactly); q is clamped to at most P inside log1p only, where
    the weight is 0 anyway (w = 0 for q >= P), so no inf or NaN can reach the weights.

    Options: p, the confidence above which tokens get no weight (InfoSFT's code: 0.93).
    """

    name = "infosft"
    Options = InfoSftOptions

    def __init__(self, p: float = 0.93, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group, p=p)
        self.logit_p = math.log(p / (1.0 - p))

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return f"CE weighted by sg(q·max(0, 1 − logit q / logit P)), P = {self.options.p:g}"

    def weights(self, token_loss: Tensor) -> Tensor:
        """The stop-gradient weights w_t (float64, detached)."""
        loss = token_loss.detach().double()
        q = torch.exp(-loss)
        logit_q = -loss - torch.log1p(-q.clamp(max=self.options.p))
        weight = q * (1.0 - logit_q / self.logit_p)
        return torch.where(q < self.options.p, weight, torch.zeros_like(weight)).clamp_min(0.0)

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        stats = group_stats(token_loss, important, self.group)
        weight = self.weights(token_loss).to(token_loss.dtype)
        contribution = (weight * token_loss).sum() * _per_token_scale(step_tokens)
        return contribution, _metrics(contribution, stats, 0.0)


@register
class DftLoss(Loss):
    """Dynamic Fine-Tuning: ``L = sum_t sg(q_t) l_t / N`` with ``q_t = exp(-l_t)`` (TRL's "dft")."""

    name = "dft"

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return "CE weighted by sg(p(token)) (DFT)"

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        stats = group_stats(token_loss, important, self.group)
        probability = torch.exp(-token_loss.detach())
        contribution = (probability * token_loss).sum() * _per_token_scale(step_tokens)
        return contribution, _metrics(contribution, stats, 0.0)


@dataclass
class EaftOptions:
    k: int = option(20, "eaft: the top-k logits whose entropy weighs each token (EAFT's code: 20); an integer >= 2", key="eaft_k")
    alpha: float = option(1.0, "eaft: the power of the normalised entropy, w = H_k^alpha (EAFT's code: 1.0; 0 = plain SFT); >= 0", key="eaft_alpha")

    def problems(self, as_key: bool = False) -> list[str]:
        name = lambda field: _shown(self, field, as_key)  # noqa: E731
        out = []
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 2:
            # k = 1: the top-1 distribution has no entropy and log 1 = 0 cannot normalise it.
            out.append(f"{name('k')}: {self.k!r} must be an integer >= 2")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (math.isfinite(self.alpha) and self.alpha >= 0):
            out.append(f"{name('alpha')}: {self.alpha!r} must be a finite number >= 0")
        return out


@register
class EaftLoss(Loss):
    """Entropy-Adaptive Fine-Tuning (EAFT, arXiv 2601.02151): ``L = sum_t w_t l_t / N``,
    ``w_t = sg(H_k(t) / log k) ** alpha``, N the step's trainable tokens (all micro-batches, all ranks).

    ``H_k(t)`` is the entropy of the live model's distribution at token t restricted to its ``k``
    largest logits and renormalised over them (``data.token_loss.top_k_entropy``, computed in the
    trainer's chunked lm_head pass from the same logits as ``l_t``: ``token_losses(..., entropy_top_k=k)``),
    divided by ``log k`` so that it lies in [0, 1]; the weight has no gradient. Confident tokens
    (low entropy, the paper's "confident conflicts") get little weight, uncertain ones up to 1.

    As its authors define it, read from their code: LLaMA-Factory ``use_eaft_loss``
    (hiyouga/LLaMA-Factory, src/llamafactory/train/trainer_utils.py ``_eaft_cross_entropy``, added in
    commit e944dc442cac475604f115a84f307ac1051cdc89, "add support for EAFT loss (#9720)", by the
    paper's first author) and the authors' ms-swift fork (ymxyll/ms-swift-EAFT, commit 7683b1e3,
    swift/megatron/trainers/trainer.py), both linked from PRIS-CV/EAFT (commit 8f9018b7):

    - top-k over the fp32 logits of the trainable targets, k = 20 (fixed there), entropy of
      ``softmax(top-k logits)``, under ``no_grad``;
    - normalised by the constant 3.0 (about ``log 20`` = 2.9957; the paper writes ``H / log K``): here
      ``log k``, so that k is an option; at k = 20 our weight is theirs times ``(3 / log 20) ** alpha``
      (1.0014 at alpha 1);
    - ``w = normalised_entropy ** alpha`` (``eaft_alpha``, default 1.0);
    - ``sum_t w_t l_t / num_items_in_batch`` (Trainer's count of the step's trainable tokens over the
      accumulated micro-batches), else the mean over the batch's trainable tokens: the step's token
      count N, not the weight sum.

    Exact under data parallelism and gradient accumulation: the weights are per token and N is the
    step's count over all ranks (the trainer all-reduces it before the step), as for ``sft``. The loss
    reads no stored score (``importance.scorer=none`` trains it on a directory without one).
    Logs ``mean_weight`` (the mean w over the micro-batch's tokens on all ranks).
    """

    name = "eaft"
    Options = EaftOptions

    def __init__(self, k: int = 20, alpha: float = 1.0, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(group, k=k, alpha=alpha)
        self.entropy_top_k = self.options.k

    @classmethod
    def label(cls, setting: Callable[[str], Any]) -> str:
        return f"{cls.name}, k {setting('loss.eaft_k')}, alpha {setting('loss.eaft_alpha')}"

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return (f"CE weighted by sg(top-{self.options.k} entropy / log {self.options.k})^{self.options.alpha:g} "
                "of the live model (EAFT)")

    def weights(self, entropy: Tensor) -> Tensor:
        """``w_t = H_k(t) ** alpha`` from the normalised top-k entropies (detached; ``0 ** 0 = 1``)."""
        return entropy.detach().clamp(0.0, 1.0) ** self.options.alpha

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float,
        entropy: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        if entropy is None or entropy.shape != token_loss.shape:
            raise ValueError("eaft needs entropy shaped like token_loss: token_losses(..., entropy_top_k=loss_fn.entropy_top_k)")
        stats = group_stats(token_loss, important, self.group)
        weight = self.weights(entropy).to(device=token_loss.device, dtype=token_loss.dtype)
        contribution = (weight * token_loss).sum() * _per_token_scale(step_tokens)
        metrics = _metrics(contribution, stats, 0.0)
        weight_sum = float(all_reduce_sum(weight.double().sum().reshape(1), self.group)[0])
        metrics["mean_weight"] = weight_sum / stats.tokens if stats.tokens else 0.0
        return contribution, metrics


@register
class SelectLoss(Loss):
    """Token selection (Token Cleaning, Pang et al. 2025): CE over the important group only.

    ``L = sum_{t important} l_t / N_important``: the load-time groups (importance.scorer at rho,
    scope) decide which tokens train; the rest get no gradient. This rank's contribution for
    micro-batch m is ``w_m * sum_{t important, local} l_t / N_{important, m}`` with
    ``w_m = N_m / step_tokens``, as SFT-GO's group term: one micro-batch per step gives exactly the
    global-batch mean over the important tokens; with accumulation, the token-weighted mean of the
    micro-batches' important-group means (``group_decision=micro_batch``). With a step decision the
    denominator is the step's important count over all ranks, known from the masks alone (``decide``
    needs no look-ahead): exactly the global-batch mean. A micro-batch without an important token
    contributes 0.
    Logs ``important_fraction`` (the fraction kept) and ``lambda`` 1.0 (all weight on the group term).
    Token Cleaning scores by base-minus-reference loss: ``importance.scorer=excess_loss``.
    """

    name = "select"
    needs_groups = True
    decides_per_step = True

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        return "CE over the important tokens only (token selection)"

    def decide(self, important: list[Tensor], token_losses: list[Tensor] | None = None,
               ref_losses: list[Tensor | None] | None = None) -> list[StepDecision]:
        """The step's important count over all ranks (from the masks: no look-ahead)."""
        device = important[0].device if important else torch.device("cpu")
        local = torch.tensor([float(sum(int(m.sum()) for m in important))], dtype=torch.float64, device=device)
        count = int(round(float(all_reduce_sum(local, self.group)[0])))
        return [StepDecision(count, 1)] * len(important)

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float,
        decision: StepDecision | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        stats = group_stats(token_loss, important, self.group)
        if decision is not None:  # the step's important count: the global-batch mean exactly
            if decision.trained_tokens > 0:
                contribution = token_loss[important].sum() / decision.trained_tokens
            else:
                contribution = token_loss.sum() * 0.0
            return contribution, _metrics(contribution, stats, 1.0)
        if stats.important_tokens > 0:
            weight = stats.tokens * _per_token_scale(step_tokens) / stats.important_tokens
            contribution = weight * token_loss[important].sum()
        else:  # nothing kept in this micro-batch on any rank; keep the graph for backward
            contribution = token_loss.sum() * 0.0
        return contribution, _metrics(contribution, stats, 1.0)


@dataclass
class WeightedOptions:
    transform: str = option("rank", "weighted: w from importance.scorer's score: identity (w = s) | rank (rank in importance.scope, in [0, 1]; sequence or corpus) | sigmoid", key="weight_transform")
    temperature: float = option(1.0, "weighted, sigmoid: w = sigmoid((s - weight_center) / weight_temperature); > 0", key="weight_temperature")
    center: float = option(0.0, "weighted, sigmoid: the score at which w = 0.5", key="weight_center")
    clip_min: float = option(0.0, "weighted: lower clip of w, >= 0", key="weight_clip_min")
    clip_max: float | None = option(None, "weighted: upper clip of w; null = none", key="weight_clip_max")

    def problems(self, as_key: bool = False) -> list[str]:
        name = lambda field: _shown(self, field, as_key)  # noqa: E731
        out = []
        if self.transform not in WeightedLoss.TRANSFORMS:
            out.append(f"{name('transform')}: {self.transform!r} is not one of {list(WeightedLoss.TRANSFORMS)}")
        if not self.temperature > 0:
            out.append(f"{name('temperature')}: {self.temperature} must be > 0")
        if not self.clip_min >= 0:
            out.append(f"{name('clip_min')}: {self.clip_min} must be >= 0 (a negative weight pushes a loss up)")
        if self.clip_max is not None and self.clip_max < self.clip_min:
            out.append(f"{name('clip_max')}: {self.clip_max} must be >= {name('clip_min')} ({self.clip_min})")
        return out


@register
class WeightedLoss(Loss):
    """Per-token weights from a stored score: ``L = sum_t w_t l_t / sum_t w_t`` over the step.

    The sums run over every micro-batch of the optimizer step on every rank (the trainer all-reduces
    ``sum_t w_t`` before the step, as it does the token count), so the loss and its gradient are
    exact under data parallelism and gradient accumulation. ``w_t`` is computed at load time from
    ``importance.scorer``'s score ``s_t`` (no gradient), then clipped to ``[clip_min, clip_max]``:

    - ``identity``: ``w = s``;
    - ``rank``: the score's rank among the trainable tokens of its scope, scaled to [0, 1] (ties get
      their mean rank; a lone token gets 1): scope ``sequence`` ranks within each example, ``corpus``
      reads the rank off the manifest's quantile sketch (the score's CDF); ``batch`` is refused;
    - ``sigmoid``: ``w = 1 / (1 + exp(-(s - center) / temperature))``.

    Weights must be >= 0 (clip_min >= 0). A step whose weights sum to 0 contributes nothing.
    """

    name = "weighted"
    Options = WeightedOptions
    needs_weights = True
    TRANSFORMS = ("identity", "rank", "sigmoid")

    @classmethod
    def config_problems(cls, options: WeightedOptions, importance_scope: str) -> list[str]:
        if options.transform == "rank" and importance_scope == "batch":
            return ["importance.scope: batch is not supported by loss.weight_transform=rank; use sequence or corpus"]
        return []

    @classmethod
    def label(cls, setting: Callable[[str], Any]) -> str:
        # No rho: every token trains, weighted by its score.
        return f"{cls.name}, {setting('importance.scorer')}, {setting('loss.weight_transform') or 'rank'}"

    def describe(self) -> str:
        """The objective in one line, with its settings (reports and logs)."""
        how = {"identity": "w = score", "rank": "w = rank of the score in its scope, in [0, 1]",
               "sigmoid": f"w = sigmoid((score − {self.options.center:g}) / {self.options.temperature:g})"}[self.options.transform]
        clip = f", clipped to [{self.options.clip_min:g}, {self.options.clip_max:g}]" if self.options.clip_max is not None else (
            f", at least {self.options.clip_min:g}" if self.options.clip_min > 0 else "")
        return f"Σ w·CE / Σ w over the step, {how}{clip}"

    def token_weights(self, score: Tensor, loss_mask: Tensor, seq_lens: list[int], scope: str,
                      corpus_quantiles: list[float] | None = None) -> Tensor:
        """``w_t`` (float32, no gradient) for every position of a packed row; 0 where not trainable."""
        score = score.reshape(-1).double()
        trainable = loss_mask.reshape(-1).bool()
        values = score.clone()
        if self.options.transform == "sigmoid":
            values = torch.sigmoid((score - self.options.center) / self.options.temperature)
        elif self.options.transform == "rank":
            if scope == "corpus":
                if not corpus_quantiles:
                    raise ValueError("rank in scope corpus needs the manifest's quantile sketch of the score")
                probs = torch.linspace(0.0, 1.0, len(corpus_quantiles), dtype=torch.float64)
                # The score's CDF, read off the inverse CDF (quantiles) the manifest stores.
                values = torch.from_numpy(np.interp(score.numpy(), np.asarray(corpus_quantiles, dtype=np.float64), probs.numpy()))
            elif scope == "sequence":
                start = 0
                for length in seq_lens:
                    segment = slice(start, start + length)
                    keep = trainable[segment]
                    values[segment][keep] = _scaled_rank(score[segment][keep])
                    start += length
            else:
                raise ValueError(f"rank weights support scope sequence or corpus, not {scope!r}")
        weights = values.clamp(min=self.options.clip_min, max=self.options.clip_max)
        return torch.where(trainable, weights, torch.zeros_like(weights)).float()

    def __call__(
        self, token_loss: Tensor, important: Tensor, ref_loss: Tensor | None, step_tokens: int, progress: float,
        weight: Tensor | None = None, step_weight: float = 0.0,
    ) -> tuple[Tensor, dict[str, float]]:
        _check_inputs(token_loss, important, ref_loss, step_tokens, progress)
        if weight is None or weight.shape != token_loss.shape:
            raise ValueError("weighted needs weight shaped like token_loss (the trainer computes it with token_weights)")
        stats = group_stats(token_loss, important, self.group)
        weight = weight.detach().to(device=token_loss.device, dtype=token_loss.dtype)
        contribution = (weight * token_loss).sum() / step_weight if step_weight > 0 else token_loss.sum() * 0.0
        metrics = _metrics(contribution, stats, 0.0)
        weight_sum = float(all_reduce_sum(weight.double().sum().reshape(1), self.group)[0])
        metrics["mean_weight"] = weight_sum / stats.tokens if stats.tokens else 0.0
        return contribution, metrics


def _scaled_rank(values: Tensor) -> Tensor:
    """Ranks of ``values`` (ties: their mean rank) scaled to [0, 1]; a single value ranks 1."""
    n = values.numel()
    if n <= 1:
        return torch.ones_like(values)
    ordered, order = torch.sort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double() - 1
    mean_rank = (ends - (counts.double() - 1) / 2)[inverse]
    ranks = torch.empty_like(mean_rank)
    ranks[order] = mean_rank
    return ranks / (n - 1)


def build_loss(name: str, **options: Any) -> Loss:
    """The loss registered as ``name``, constructed with its options (unknown options raise TypeError)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[name](**options)
