"""Learning-rate schedules, the per-method default learning rate, and the step count."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config import RunConfig
from tunelab.methods.base import Method
from tunelab.train.batches import DataPosition, WindowSampler, steps_per_epoch, total_steps
from tunelab.train.optim import build_scheduler, lr_factor, resolve_lr


def _lrs(schedule, warmup, total, peak=1.0):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, warmup=warmup, total=total, schedule=schedule))
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out, sched.get_last_lr()[0]


def test_warmup_then_cosine_reaches_zero_at_total():
    lrs, after = _lrs("cosine", warmup=4, total=20)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    mid = 4 + (20 - 4) // 2
    assert lrs[mid] == pytest.approx(0.5)  # cosine is half way at half the decay
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # strictly decreasing after warm-up
    assert after == pytest.approx(0.0, abs=1e-12)


def test_linear_decay_is_linear():
    lrs, after = _lrs("linear", warmup=0, total=10)
    assert lrs == pytest.approx([1 - i / 10 for i in range(10)])
    assert after == pytest.approx(0.0)


def test_constant_after_warmup():
    lrs, _ = _lrs("constant", warmup=2, total=6)
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_cosine_shape_matches_formula():
    total, warmup = 30, 5
    for s in range(warmup, total):
        expected = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert lr_factor(s, warmup=warmup, total=total, schedule="cosine") == pytest.approx(expected)


def test_build_scheduler_uses_config():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = build_scheduler(opt, RunConfig(schedule="linear", warmup_steps=1), total=3)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.1, 0.05])


def test_default_lr_comes_from_the_method_when_unset():
    class Slow(Method):
        name, family, trains = "slow", "full", "x"
        default_lr = 2e-5

    class Plain(Method):
        name, family, trains = "plain", "x", "x"

    assert resolve_lr(RunConfig(), Slow()) == 2e-5
    assert resolve_lr(RunConfig(), Plain()) == 2e-4  # the base class default
    assert resolve_lr(RunConfig(lr=1e-3), Slow()) == 1e-3


def test_total_steps_from_epochs_and_max_steps():
    assert steps_per_epoch(17, 2, 4) == 3  # ceil(17 / 8)
    assert total_steps(RunConfig(batch_size=2, grad_accum=4, epochs=2), 17) == 6
    assert total_steps(RunConfig(batch_size=2, grad_accum=4, epochs=0.5), 17) == 2
    assert total_steps(RunConfig(max_steps=5, epochs=3), 17) == 5


def test_windows_cover_each_epoch_once_and_do_not_cross_it():
    from tunelab.data.collate import epoch_order

    sampler = WindowSampler(n=10, seed=7, batch_size=2, grad_accum=2)
    seen = [sampler.next_window() for _ in range(6)]  # 3 windows per epoch: 4 + 4 + 2
    assert [sum(len(mb) for mb in w) for w in seen] == [4, 4, 2, 4, 4, 2]
    assert [i for w in seen[:3] for mb in w for i in mb] == epoch_order(10, 7, 0)
    assert [i for w in seen[3:] for mb in w for i in mb] == epoch_order(10, 7, 1)
    assert sampler.position == DataPosition(epoch=1, index=10)


def test_sampler_resumed_from_a_position_continues_the_same_sequence():
    straight = WindowSampler(n=9, seed=1, batch_size=3, grad_accum=1)
    windows = [straight.next_window() for _ in range(7)]
    part = WindowSampler(n=9, seed=1, batch_size=3, grad_accum=1)
    for _ in range(4):
        part.next_window()
    resumed = WindowSampler(n=9, seed=1, batch_size=3, grad_accum=1,
                            position=DataPosition.from_json(part.position.to_json(), "test"))
    assert [resumed.next_window() for _ in range(3)] == windows[4:]
