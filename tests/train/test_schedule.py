"""train.schedule: warmup ramp, cosine / linear / constant decay to min_lr_ratio, LambdaLR wiring."""

from __future__ import annotations

import math

import pytest
import torch

from train.config import OptimConfig
from train.schedule import lr_at, make_scheduler, warmup_steps


def optim(**kw) -> OptimConfig:
    return OptimConfig(**kw)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_warmup_ramp(schedule):
    o = optim(schedule=schedule, warmup_steps=4)
    # (step + 1) / (W + 1): the first step is not at lr 0; the peak comes at step W.
    assert [lr_at(s, 100, o) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cosine(floor):
    o = optim(schedule="cosine", warmup_steps=10, min_lr_ratio=floor)
    total = 110  # 100 decay steps after warmup
    assert lr_at(10, total, o) == pytest.approx(1.0)  # warmup end = peak
    assert lr_at(60, total, o) == pytest.approx(floor + (1 - floor) * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(35, total, o) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(109, total, o) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.99)))
    assert lr_at(109, total, o) > floor  # the last update still moves the weights
    assert lr_at(110, total, o) == pytest.approx(floor)
    assert lr_at(500, total, o) == pytest.approx(floor)  # beyond the end: stays at the floor


@pytest.mark.parametrize("floor", [0.0, 0.2])
def test_linear(floor):
    o = optim(schedule="linear", warmup_steps=10, min_lr_ratio=floor)
    assert lr_at(10, 110, o) == pytest.approx(1.0)
    assert lr_at(60, 110, o) == pytest.approx(1 - (1 - floor) * 0.5)
    assert lr_at(85, 110, o) == pytest.approx(1 - (1 - floor) * 0.75)
    assert lr_at(110, 110, o) == pytest.approx(floor)


def test_constant_ignores_the_floor():
    o = optim(schedule="constant", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(1, 10, o) == pytest.approx(2 / 3)
    assert [lr_at(s, 10, o) for s in (2, 5, 9, 10, 20)] == [1.0] * 5


def test_no_warmup_starts_at_the_peak():
    o = optim(schedule="cosine")
    assert lr_at(0, 10, o) == 1.0
    assert lr_at(5, 10, o) == pytest.approx(0.5)


def test_cosine_is_monotone_after_warmup():
    o = optim(schedule="cosine", warmup_ratio=0.07, min_lr_ratio=0.05)
    values = [lr_at(s, 200, o) for s in range(warmup_steps(200, o), 201)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_warmup_ratio_rounds_up_without_float_error():
    assert warmup_steps(100, optim(warmup_ratio=0.07)) == 7  # 0.07 * 100 = 7.000000000000001
    assert warmup_steps(101, optim(warmup_ratio=0.07)) == 8
    assert warmup_steps(100, optim(warmup_steps=3)) == 3
    assert warmup_steps(100, optim()) == 0


def test_warmup_longer_than_training():
    o = optim(warmup_steps=10)
    assert lr_at(4, 5, o) == pytest.approx(5 / 11)  # still ramping when training ends


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, 0, optim())
    with pytest.raises(ValueError, match="step must be"):
        lr_at(-1, 10, optim())
    with pytest.raises(ValueError, match="optim.schedule"):
        lr_at(0, 10, optim(schedule="step"))


def test_make_scheduler_drives_the_optimizer_lr():
    o = optim(lr=1e-3, schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=o.lr)
    scheduler = make_scheduler(optimizer, 10, o)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])  # the lr this optimizer step uses
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([o.lr * lr_at(s, 10, o) for s in range(10)])
    # Resume: a fresh scheduler loaded from the state continues at the same step.
    state = scheduler.state_dict()
    optimizer2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=o.lr)
    resumed = make_scheduler(optimizer2, 10, o)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 10
    resumed.step()
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(o.lr * lr_at(11, 10, o))
