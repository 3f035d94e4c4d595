"""train.log, plain progress lines off a terminal, --report-to (TensorBoard read back), curves.png."""

from __future__ import annotations

import json
import re
import sys

import pytest
from PIL import Image

from tests.test_pretrain import TINY
from twinray.train import finetune, runlog
from twinray.train.config import ConfigError, PretrainConfig
from twinray.train.pretrain import main

BASE = [a for a in TINY if a not in ("--wandb", "disabled")]  # trackers chosen by --report-to here


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_to_train_log_and_tensorboard_prints_plain_lines_and_draws_curves(covid_packed, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ["--data", str(covid_packed), "--out", str(out), "--epochs", "2", "--log-every", "1", "--eval-every", "1"]
    args += ["--knn-bank", "40", "--report-to", "tensorboard", "--max-steps", "5", *BASE]
    assert main(args) == 0
    captured = capsys.readouterr()
    rows = _rows(out)
    per_epoch = next(r["step"] for r in rows if r.get("epoch_end"))
    assert per_epoch < 5  # the run crossed into epoch 2 before --max-steps stopped it

    # stderr is no terminal here: whole progress lines, each step of the epoch (each is over a tenth of it)
    assert "\r" not in captured.err
    said = re.findall(r"^epoch 1/2: (\d+)/(\d+) \((\d+)%\) [\d.]+ s", captured.err, re.M)
    assert [int(n) for n, _, _ in said] == list(range(1, per_epoch + 1))
    assert {int(t) for _, t, _ in said} == {per_epoch} and said[-1][2] == "100"
    assert re.search(rf"^epoch 2/2: {5 - per_epoch}/{per_epoch} ", captured.err, re.M)  # the stopped epoch, at close

    # TensorBoard through Accelerate: the loss scalars are metrics.jsonl's, step for step
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    scalars = []
    for path in events:
        acc = EventAccumulator(str(path)).Reload()
        if "loss" in acc.Tags()["scalars"]:
            scalars += [(e.step, e.value) for e in acc.Scalars("loss")]
    logged = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert len(logged) == 6  # 5 steps and the first epoch's mean
    assert [s for s, _ in scalars] == [s for s, _ in logged]
    assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6)  # float32 in the event file

    # train.log: the header, then the epoch line as printed, then the stop
    log = (out / "train.log").read_text().splitlines()
    assert log[0].startswith("==== started ")
    assert log[1] == "command: twinray pretrain " + " ".join(args)  # main() called from Python: as `twinray pretrain`
    assert re.fullmatch(r"versions: twinray \S+, torch \S+, timm \S+, python 3\.\d+\.\d+", log[2])
    assert log[3] == "device: cpu, 1 process on 1 node, precision no"
    assert '  report_to: "tensorboard"' in log and "  world_size: 1" in log and "  batch_size: 16" in log
    epoch_line = next(line for line in captured.out.splitlines() if line.startswith("epoch 1/2"))
    assert log[-2].endswith(" " + epoch_line)
    assert log[-1].endswith(
        " stopped (max_steps) at step 5; checkpoint saved, re-run with a larger --max-steps, or without it, to continue"
    )

    # curves.png, with no tracker needed: a real PNG
    with Image.open(out / "curves.png") as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 0 and png.size[1] > 0

    # a resume appends: a separator naming the checkpoint, the header again, the next epoch lines
    assert main([a for a in args if a not in ("--max-steps", "5")]) == 0
    after = (out / "train.log").read_text().splitlines()
    assert after[: len(log)] == log
    assert re.fullmatch(
        rf"==== resumed from ckpt-0*5: epoch 1, step {5 - per_epoch} of {per_epoch}, .* ====", after[len(log)]
    )
    assert after[len(log) + 1] == log[1].replace(" --max-steps 5", "")
    assert re.search(r" epoch 2/2  mean loss ", after[-2])
    assert after[-1].endswith(
        f" done: 2 epochs, {2 * per_epoch} steps; backbone written to {out / 'backbone.safetensors'}"
    )


def test_a_missing_tracker_package_is_one_line_before_anything_is_written(covid_packed, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError, as where it is not installed
    out = tmp_path / "run"
    code = main(["--data", str(covid_packed), "--out", str(out), "--report-to", "tensorboard,mlflow", *BASE])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "mlflow is not installed: pip install mlflow" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "text, names",
    [
        ("wandb", ("wandb",)),
        ("tensorboard, wandb", ("tensorboard", "wandb")),
        ("none", ()),
        ("mlflow,mlflow", ("mlflow",)),
    ],
)
def test_report_to_names(text, names):
    assert runlog.parse_report_to(text) == names


@pytest.mark.parametrize("text, needle", [("wandb,tb", "'tb' is not one of: wandb, tensorboard, mlflow, none"),
                                          ("none,wandb", "none goes alone")])  # fmt: skip
def test_a_bad_report_to_is_a_config_error(text, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        PretrainConfig(report_to=text).validate()


def test_wandb_disabled_drops_wandb_from_report_to(tmp_path):
    from twinray.train.pretrain import _trackers

    assert _trackers(PretrainConfig(report_to="wandb", wandb="disabled")) is None
    assert _trackers(PretrainConfig(report_to="wandb,tensorboard", wandb="disabled")) == ["tensorboard"]


HANDWRITTEN = [
    {"step": 1, "epoch": 0, "loss": 4.0, "lr": 0.1, "data_wait": 0.0, "warmup": True},
    {"step": 2, "epoch": 0, "loss": 3.0, "lr": 0.2, "images_per_s": 100.0},
    {"step": 2, "epoch": 0, "epoch_end": True, "loss": 3.5, "probe_loss": 1.0, "probe_acc": 0.4, "knn_acc": 0.5,
     "rankme": 7.5, "emb_std": 0.03},
    {"step": 3, "epoch": 1, "loss": 2.0, "lr": 0.3, "images_per_s": 120.0},
    {"step": 4, "epoch": 1, "loss": 1.0, "lr": 0.4, "images_per_s": 140.0},
    {"step": 4, "epoch": 1, "epoch_end": True, "loss": 1.5, "probe_acc": 0.6},
    {"step": 5, "epoch": 2, "loss": 0.5, "lr": 0.5, "images_per_s": 150.0},
]  # fmt: skip


def test_curves_are_read_from_a_handwritten_metrics_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in HANDWRITTEN) + '{"step": 6, "ep')  # cut by a kill
    png = tmp_path / "curves.png"
    panels = runlog.draw_curves(metrics, png)
    assert list(panels) == ["loss", "kNN", "probe", "lr", "images/s", "rankme", "emb_std"]
    # step rows at their fraction of the epoch; the third epoch has no end yet: the last epoch's length
    assert panels["loss"] == {
        "step": ([0.5, 1.0, 1.5, 2.0, 2.5], [4.0, 3.0, 2.0, 1.0, 0.5]),
        "epoch mean": ([1, 2], [3.5, 1.5]),
    }
    assert panels["probe"] == {"probe_acc": ([1, 2], [0.4, 0.6])}  # its loss is left out
    assert panels["kNN"] == {"knn_acc": ([1], [0.5])}
    assert panels["images/s"] == {"images/s": ([1.0, 1.5, 2.0, 2.5], [100.0, 120.0, 140.0, 150.0])}
    assert panels["rankme"] == {"rankme": ([1], [7.5])}
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG"
    assert png.stat().st_size > 0

    # before any epoch has ended, the x axis is the step; no health figures, no such panels
    metrics.write_text("".join(json.dumps(r) + "\n" for r in HANDWRITTEN[:2]))
    panels = runlog.draw_curves(metrics, png)
    assert list(panels) == ["loss", "lr", "images/s"]
    assert panels["lr"] == {"lr": ([1.0, 2.0], [0.1, 0.2])}


def test_plain_progress_prints_a_line_per_tenth_and_at_close(capsys):
    with runlog.progress(total=20, initial=4, desc="epoch 1/1") as bar:
        assert isinstance(bar, runlog.PlainProgress)  # stderr is captured here: no terminal
        for _ in range(11):
            bar.update()
            bar.set_postfix(loss="0.50")
    err = capsys.readouterr().err
    assert "\r" not in err
    counts = [int(n) for n in re.findall(r"^epoch 1/1: (\d+)/20 ", err, re.M)]
    assert counts == [6, 8, 10, 12, 14, 15]  # every 2 steps (a tenth of 20) from the resumed step 4; 15 at close
    assert err.splitlines()[-1].startswith("epoch 1/1: 15/20 (75%) ") and err.endswith("  loss 0.50\n")


def test_finetune_writes_train_log(covid_packed, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["--data", str(covid_packed), "--out", str(out), "--init", "random", "--mode", "linear", "--epochs", "2"]
    args += ["--size", "32", "--batch-size", "16", "--workers", "1"]
    assert finetune.main(args) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    log = (out / "train.log").read_text().splitlines()
    assert log[0].startswith("==== started ") and log[1] == "command: twinray finetune " + " ".join(args)
    assert log[3] == "device: cpu" and '  mode: "linear"' in log
    epochs = [line for line in log if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d epoch ", line)]
    assert [line[20:] for line in epochs] == printed and len(printed) == 2
