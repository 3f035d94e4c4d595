"""The pieces the training loops are made of: the meter's progress bar, pretrain's accumulated step, the shared
resume point (train/meter.py, train/step.py train_step, train/resume.py)."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from twinray.train import checkpoint
from twinray.train.meter import StepMeter
from twinray.train.resume import latest_checkpoint
from twinray.train.step import StepOutput, train_step


class Bar:
    """The part of tqdm's interface the meter uses, recording each call."""

    def __init__(self):
        self.calls: list[str] = []

    def update(self, n: int = 1) -> None:
        self.calls.append("update")

    def close(self) -> None:
        self.calls.append("close")


def figures(loss: float = 1.0) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss)}


def test_push_moves_the_bar_and_the_pass_closes_it_when_left_early():
    meter, bar = StepMeter(), Bar()
    for i, _ in enumerate(meter.batches(range(5), bar)):
        meter.push(figures(), images=2, step=i)
        if i == 1:
            break
    assert bar.calls == ["update", "update", "close"]
    meter.push(figures(), images=2)  # outside a pass: no bar to move
    assert bar.calls == ["update", "update", "close"]


def test_the_bar_is_closed_before_an_error_reaches_its_handler():
    meter, bar = StepMeter(), Bar()
    try:
        for i, _ in enumerate(meter.batches(range(5), bar)):
            meter.push(figures(), images=2, step=i)
            raise RuntimeError("in the step")
    except RuntimeError:
        in_handler = list(bar.calls)  # what the error line's writer (pretrain's main) finds
    assert in_handler == ["update", "close"]


def test_a_whole_pass_closes_the_bar_once_and_batches_work_without_one():
    meter, bar = StepMeter(), Bar()
    assert list(meter.batches(range(3), bar)) == [0, 1, 2] and bar.calls == ["close"]
    assert list(meter.batches(range(3))) == [0, 1, 2]


class Accumulating:
    """Accelerate's accumulation as the step sees it: every `every`-th batch is an update (`sync_gradients`)."""

    def __init__(self, every: int):
        self.every, self.batches, self.sync_gradients = every, 0, False

    @contextmanager
    def accumulate(self, model):
        self.batches += 1
        self.sync_gradients = self.batches % self.every == 0
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class Mean:
    """A method whose loss is the mean output of the first view."""

    def __call__(self, model, views):
        out = model(views[0])
        return StepOutput(out.mean(), out.detach(), {})

    def after_update(self, model) -> None:
        pass


def test_the_step_moves_the_schedule_once_per_update_and_adds_the_side_streams_figures():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    side = SimpleNamespace(step=lambda: {"probe_loss": torch.tensor(0.5)})
    each = dict(accelerator=Accumulating(2), scheduler=scheduler, side=side)
    got = [train_step(model, Mean(), [torch.ones(4, 3)], optimizer, **each) for _ in range(5)]
    assert scheduler.last_epoch == 2  # 5 batches, an update every 2
    assert set(got[0]) == {"loss", "probe_loss"} and got[0]["loss"].requires_grad is False
    train_step(model, Mean(), [torch.ones(4, 3)], optimizer, scheduler=scheduler)  # no accelerator: an update
    assert scheduler.last_epoch == 3


def test_the_resume_point_is_the_newest_checkpoint_unless_forced(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    checkpoint.save(tmp_path, 3, {"position": {"step": 3}, "w": torch.zeros(2)})
    checkpoint.save(tmp_path, 6, {"position": {"step": 6}, "w": torch.ones(2)})
    saved = latest_checkpoint(tmp_path)
    assert saved["name"] == "ckpt-000000006" and saved["position"] == {"step": 6} and saved["w"].tolist() == [1, 1]
    assert latest_checkpoint(tmp_path, force=True) is None
