import math

import pytest
import torch

from scalelm.config import load_config
from scalelm.train.schedule import lr_at, lr_scheduler


def optim(*overrides):
    return load_config(None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_steps=10", "train.steps=110",
                              *overrides]).optim


def test_warmup_then_cosine_to_min():
    o = optim()
    assert lr_at(0, o) == pytest.approx(1e-4) and lr_at(9, o) == pytest.approx(1e-3)
    assert lr_at(60, o) == pytest.approx(1e-4 + 0.9e-3 * (1 + math.cos(math.pi * 0.5)) / 2)
    assert lr_at(110, o) == pytest.approx(1e-4) and lr_at(500, o) == pytest.approx(1e-4)
    lrs = [lr_at(s, o) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises after warmup


def test_linear_and_constant():
    assert lr_at(60, optim("optim.decay=linear")) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(100, optim("optim.decay=constant")) == pytest.approx(1e-3)


def test_torch_scheduler_follows_it():
    o = optim()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=o.lr)
    sched = lr_scheduler(opt, o)
    seen = []
    for _ in range(30):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, o) for s in range(30)])
