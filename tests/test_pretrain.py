"""Pretraining on the CPU at a tiny resolution: config, checkpoints, resume, distributed, logs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, assert_one_line_error, run_torchrun, twinray_here
from twinray import atomic
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep.format import PackedDataset
from twinray.train import checkpoint
from twinray.train.config import ConfigError, PretrainConfig, from_args
from twinray.train.heads import build_projector
from twinray.train.health import effective_rank
from twinray.train.losses.barlow import barlow_twins_loss
from twinray.train.meter import NonFiniteLoss, StepMeter
from twinray.train.methods.barlow import BarlowTwinsMethod
from twinray.train.model import BarlowTwins
from twinray.train.online_eval import LinearProbe
from twinray.train.optim import build_optimizer, lr_factor
from twinray.train.pretrain import knn_bank_rows
from twinray.train.state import Position, build_run, resume_changes, settings
from twinray.train.state import part as run_part
from twinray.train.step import train_step

TINY = ["--size", "32", "--batch-size", "16", "--projector", "64", "--wandb", "disabled", "--workers", "1"]


def pretrain_process(*args, env=None) -> subprocess.CompletedProcess:
    """`python train/pretrain.py ARGS` in a fresh process, for what only a process shows: torch.compile's own
    state, bf16 (accelerate fixes the first Accelerator's mixed precision for the whole process), a missing wandb, a
    CUDA run."""
    return subprocess.run(
        [sys.executable, "train/pretrain.py", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def pretrain(capsys, *args) -> subprocess.CompletedProcess:
    """`twinray pretrain ARGS` in this process (tests/conftest.py twinray_here): the same lines and exit code as a
    subprocess, without its seconds of start-up."""
    return twinray_here(capsys, "pretrain", *args)


def test_defaults_are_the_studys_final_settings():
    cfg = PretrainConfig()
    assert (cfg.size, cfg.batch_size, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule) == (
        224,
        128,
        "adam",
        2e-3,
        1e-5,
        "cosine",
    )
    assert (cfg.lambd, cfg.projector, cfg.recipe, cfg.epochs, cfg.backbone, cfg.channels) == (
        5e-3,
        "512",
        "seed-final",
        300,
        "resnet18",
        1,
    )


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\noptimizer: lars\n")
    cfg, _ = from_args(["--config", str(path), "--lr", "0.02", "--no-compile"])
    assert (cfg.epochs, cfg.lr, cfg.optimizer, cfg.compile) == (7, 0.02, "lars", False)
    path.write_text("epoch: 7\n")
    with pytest.raises(ConfigError, match="unknown field.*epoch"):
        from_args(["--config", str(path)])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--optimizer", "adagrad"], ["optimizer 'adagrad'", "adam, adamw, lars, sgd"]),
        (["--schedule", "step"], ["schedule 'step'", "constant, linear, cosine"]),
        (["--epochs", "many"], ["--epochs", "many"]),
        (["--projector", "512-x"], ["projector '512-x'"]),
        (["--backend", "tfrecord"], ["backend 'tfrecord'", "native, dali, ffcv"]),
        (["--knn-bank", "0"], ["knn_bank must be at least 1, got 0"]),
        (["--compile-mode", "fast"], ["compile_mode 'fast'", "max-autotune-no-cudagraphs, reduce-overhead"]),
    ],
)
def test_bad_values_are_one_line_with_choices(args, needles, tmp_path, capsys):
    assert_one_line_error(pretrain(capsys, "--data", tmp_path, "--out", tmp_path / "run", *args), *needles)


def test_the_knn_bank_is_a_fixed_subset_of_large_train_splits(covid_packed):
    from twinray.prep.format import PackedDataset
    from twinray.train.pretrain import knn_bank_rows

    data = PackedDataset(covid_packed)
    train = data.indices("train")
    assert np.array_equal(knn_bank_rows(data, len(train), seed=0), train)
    bank = knn_bank_rows(data, 25, seed=0)
    assert len(bank) == 25 and np.isin(bank, train).all() and np.all(np.diff(bank) > 0)
    assert np.array_equal(bank, knn_bank_rows(data, 25, seed=0))
    assert not np.array_equal(bank, knn_bank_rows(data, 25, seed=1))


def test_missing_data_is_one_line(tmp_path, capsys):
    assert_one_line_error(pretrain(capsys, "--data", tmp_path / "nope", "--out", tmp_path / "run", *TINY), "nope")


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_leftover(tmp_path):
    path = atomic.write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_checkpoint_round_trip_without_pickle(tmp_path):
    model = BarlowTwins(projector="32-16")
    optimizer = build_optimizer(model, "adamw", 1e-3, 1e-4, exclude_bias_norm=True)
    model(torch.rand(4, 1, 32, 32))[1].sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pos": (3, [1, 2]), "n": None}
    for step in (5, 10, 15):
        path = checkpoint.save(tmp_path, step, state, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000010", "ckpt-000000015"]
    assert checkpoint.latest(tmp_path) == path
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    loaded = checkpoint.load(path)
    assert loaded["pos"] == (3, [1, 2]) and loaded["n"] is None
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    fresh = build_optimizer(model, "adamw", 1e-3, 1e-4, exclude_bias_norm=True)
    fresh.load_state_dict(loaded["optimizer"])
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert set(fresh.state_dict()["state"]) == set(optimizer.state_dict()["state"])


@pytest.mark.parametrize("damage", ["truncated tensors", "mangled state", "missing tensor"])
def test_a_damaged_checkpoint_is_one_line_naming_it(damage, tmp_path):
    path = checkpoint.save(tmp_path, 7, {"w": torch.ones(3), "step": 7})
    tensors, state = path / "tensors.safetensors", path / "state.json"
    if damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:20])
    elif damage == "mangled state":
        state.write_text(state.read_text()[:-3])
    else:
        state.write_text(state.read_text().replace('"/w"', '"/gone"'))
    with pytest.raises(ValueError, match=r"ckpt-000000007: unreadable checkpoint \(.+\); delete it") as caught:
        checkpoint.load(path)
    assert "\n" not in str(caught.value)


def test_a_run_whose_checkpoint_is_damaged_stops_with_one_line(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(capsys, "--data", covid_packed, "--out", out, "--max-steps", "1", *TINY).returncode == 0
    saved = checkpoint.latest(out)
    (saved / "tensors.safetensors").write_bytes(b"\0" * 10)
    result = pretrain(capsys, "--data", covid_packed, "--out", out, "--epochs", "2", *TINY)
    assert_one_line_error(result, f"{saved}: unreadable checkpoint", "delete it")


def test_a_shard_cut_short_stops_the_run_with_one_line_naming_it(covid_packed, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(covid_packed, data)
    shard = sorted(data.glob("train-*.tar"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    result = pretrain(capsys, "--data", data, "--out", tmp_path / "run", "--epochs", "1", *TINY)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.fullmatch(
        rf"pretrain: error: {shard}: row \d+ ends at byte \d+, past the shard's 1000; .*",
        result.stderr.splitlines()[-1],
    )


def test_projector_specs_and_zero_initialised_blocks():
    proj = build_projector(512, "8192-8192-8192")
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in proj if isinstance(m, torch.nn.Linear))
    assert [type(m).__name__ for m in build_projector(512, "512")] == ["Linear"]
    model = BarlowTwins("resnet18", 1, "512")
    assert model.backbone.conv1.in_channels == 1 and model.backbone.num_features == 512
    for block in (b for layer in (model.backbone.layer1, model.backbone.layer4) for b in layer):
        assert torch.count_nonzero(block.bn2.weight) == 0  # each block starts as the identity


def test_lars_and_exclusions():
    model = BarlowTwins(projector="32-16")
    lars = build_optimizer(model, "lars", 0.1, 1e-6)
    decayed, plain = lars.param_groups
    assert decayed["weight_decay"] == 1e-6 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim <= 1 for p in plain["params"])
    assert len(build_optimizer(model, "adam", 1e-3, 1e-5).param_groups) == 1  # no exclusion unless asked


def test_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0


def _figures(loss: float, acc: float = 0.5) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), "probe_acc": torch.tensor(acc)}


def test_the_meter_reads_each_step_after_the_next_is_queued():
    meter = StepMeter()
    meter.push(_figures(9.0), images=4, step=0)  # the first step is read at once: it is the warm-up
    assert meter.last["loss"] == 9.0
    meter.push(_figures(8.0), images=4, step=1)
    assert meter.last["loss"] == 9.0  # step 1 is held, unread, while the device works on it
    meter.push(_figures(7.0), images=4, step=2)
    assert meter.last["loss"] == 8.0  # queueing step 2 read step 1
    meter.settle()  # before logging or saving: read what is held now
    assert meter.last["loss"] == 7.0
    assert meter.epoch_means() == {"loss": 8.0, "probe_acc": 0.5}
    meter.new_epoch()
    assert meter.epoch_means() == {}


def test_the_first_window_is_the_warm_up_and_leaves_the_first_step_out():
    meter = StepMeter()
    meter.push(_figures(1.0), images=16)
    first = meter.window()
    assert first["warmup"] is True and "images_per_s" not in first  # only the warm-up step: no rate
    meter.push(_figures(1.0), images=16)
    meter.settle()
    second = meter.window()
    assert "warmup" not in second and second["images_per_s"] > 0 and 0 <= second["data_wait"] <= 1
    late = StepMeter()  # a window that runs past the warm-up step is still the warm-up window
    late.push(_figures(1.0), images=16)
    late.push(_figures(1.0), images=16)
    late.settle()
    assert late.window()["warmup"] is True and "warmup" not in late.window()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_is_caught_when_read_naming_its_step(bad):
    meter = StepMeter()
    meter.push(_figures(1.0), images=4, step=0, epoch=0)
    meter.push(_figures(bad), images=4, step=1, epoch=0)  # held: nothing is known yet
    with pytest.raises(NonFiniteLoss, match=rf"loss is {bad} at step 1 \(epoch 0\)"):
        meter.push(_figures(1.0), images=4, step=2, epoch=0)


def test_the_step_is_the_barlow_twins_loss_of_both_views_then_one_update():
    """train_step against the step written out by hand: the same loss, the same weights after SGD, no gradient
    left behind, and the probe trained on the first view's features."""
    torch.manual_seed(0)
    model = BarlowTwins(projector="16")
    twin = BarlowTwins(projector="16")
    twin.load_state_dict(model.state_dict())
    views = [torch.rand(6, 1, 16, 16), torch.rand(6, 1, 16, 16)]
    probe = LinearProbe(512, 3, multilabel=False)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    figures = train_step(model, BarlowTwinsMethod(lambd=0.01), views, sgd, probe=probe, labels=labels)

    loss, terms = barlow_twins_loss(twin(views[0])[1], twin(views[1])[1], 0.01)
    loss.backward()
    with torch.no_grad():
        expected = {k: p - 0.1 * p.grad for k, p in twin.named_parameters()}
    assert float(figures["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(figures["off_diag"]) == pytest.approx(float(terms["off_diag"]), rel=1e-6)
    assert set(figures) == {"loss", "on_diag", "off_diag", "probe_loss", "probe_acc"}
    assert not figures["loss"].requires_grad  # detached: reading it later keeps no graph alive
    for name, p in model.named_parameters():
        assert torch.allclose(p, expected[name], atol=1e-6), name
        assert p.grad is None  # zeroed for the next step
    assert probe.head[1].weight.grad is not None  # the probe took its own step


def test_the_barlow_twins_step_is_written_once():
    """pretrain, the LR finder and both training benchmarks run train/step.py's step, so the benchmarks time the
    step a run takes: no other library file computes the loss itself."""
    library = [p for folder in ("prep", "pipelines", "train", "bench") for p in (REPO / folder).rglob("*.py")]
    callers = [str(p.relative_to(REPO)) for p in library if "barlow_twins_loss(" in p.read_text()]
    assert sorted(callers) == ["train/losses/barlow.py", "train/methods/barlow.py"]
    for path in ("train/pretrain.py", "train/lr_find.py", "bench/train_speed.py", "bench/resources.py"):
        assert "train_step(" in (REPO / path).read_text(), path


def test_the_run_state_round_trips_through_a_checkpoint(tmp_path):
    """Everything resume needs, through safetensors + JSON: weights, optimizer moments, schedule, probe, RNG and
    position; a new --lr replaces the saved base lr at the same point of the schedule."""
    cfg = PretrainConfig(projector="16", epochs=4, lr=1e-3)
    torch.manual_seed(0)
    run = build_run(cfg, torch.device("cpu"), steps_per_epoch=5, classes=3, multilabel=False)
    views = [torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)]
    for _ in range(2):
        train_step(run.model, run.method, views, run.optimizer, probe=run.probe, labels=torch.tensor([0, 1, 2, 0]))
        run.scheduler.step()
    run.position = Position(step=2, epoch=0, in_epoch=2)
    saved = checkpoint.save(tmp_path, 2, {**run.state_dict(), "config": cfg.to_dict()})
    draw = torch.rand(3)  # what the RNG gives next

    torch.manual_seed(1)  # another initialisation and RNG state, overwritten by the load
    fresh = build_run(PretrainConfig(projector="16", epochs=4, lr=2e-3), torch.device("cpu"), 5, 3, False)
    fresh.load_state_dict(checkpoint.load(saved), lr=2e-3)
    assert fresh.position == Position(step=2, epoch=0, in_epoch=2)
    assert torch.equal(torch.rand(3), draw)
    for part in ("model", "probe"):
        a, b = getattr(run, part).state_dict(), getattr(fresh, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = run.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg_sq"], b[k]["exp_avg_sq"]) for k in a)
    assert fresh.scheduler.last_epoch == 2
    assert fresh.optimizer.param_groups[0]["lr"] == pytest.approx(2 * run.optimizer.param_groups[0]["lr"])
    saved = run_part(0, "d", 1, 1, settings(cfg, "ab" * 32, "no"))

    def now(**fields):
        return run_part(
            0, "d", 2, 1, settings(PretrainConfig(**{"projector": "16", "epochs": 4, **fields}), "ab" * 32, "no")
        )

    assert resume_changes("run", saved, now(lr=2e-3), Position()) == {"lr": (1e-3, 2e-3), "world_size": (1, 2)}
    with pytest.raises(ConfigError, match=r"^run holds a run with other settings: projector '16', now '32'; resume"):
        resume_changes("run", saved, now(lr=1e-3, projector="32"), Position())


def test_short_run_logs_checkpoints_and_exports_a_timm_backbone(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--epochs", "2", "--log-every", "1", "--eval-every", "1", "--knn-bank", "40", *TINY]
    result = pretrain(capsys, "--data", covid_packed, "--out", out, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 2/2" in result.stdout and result.stdout.count("knn_acc") == 2  # every epoch, as asked
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("epoch_end")]
    # The first window holds the first step (compilation, allocator growth) alone here: marked, and no images/s.
    assert steps[0]["warmup"] is True and "images_per_s" not in steps[0]
    assert not any("warmup" in r for r in rows[1:])
    for key in (
        "step",
        "epoch",
        "loss",
        "on_diag",
        "off_diag",
        "lr",
        "images_per_s",
        "data_wait",
        "peak_memory_mb",
        "probe_acc",
    ):
        assert key in steps[1], key
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # no step repeated
    # Each epoch line is the mean of its steps' figures (every step is logged here, at --log-every 1).
    for end in (r for r in rows if r.get("epoch_end")):
        mine = [r for r in steps if r["epoch"] == end["epoch"]]
        for key in ("loss", "on_diag", "probe_loss", "probe_acc"):
            assert end[key] == pytest.approx(sum(r[key] for r in mine) / len(mine), rel=1e-6), key
    assert any("knn_acc" in r for r in rows)
    assert json.loads((out / "config.json").read_text())["world_size"] == 1
    info = json.loads((out / "backbone.json").read_text())
    backbone = timm.create_model(info["timm_name"], num_classes=0, in_chans=info["in_chans"])
    backbone.load_state_dict(load_file(out / "backbone.safetensors"))
    backbone.eval()
    assert backbone(torch.rand(1, 1, 32, 32)).shape == (1, info["num_features"])
    # The health figures (docs/health.md) at each evaluation; the last one's RankMe read back from the exported
    # backbone on the same bank of train images.
    evals = [r for r in rows if r.get("epoch_end")]
    for r in evals:
        assert 1 <= r["rankme"] <= 40 and 0 < r["emb_std"] < 1, r
        assert -1 <= r["corr_diag"] <= 1 and 0 <= r["corr_off"] <= 1 and r["health_s"] >= 0, r
    data = PackedDataset(covid_packed)
    bank = knn_bank_rows(data, 40, seed=0)
    loader = build_loader(
        covid_packed,
        LoaderSettings(
            split="train", batch_size=16, device="cpu", recipe=EVAL_RECIPE, size=32, drop_last=False, rows=bank
        ),
    )
    with loader, torch.no_grad():
        features = torch.cat([backbone(b.views[0]) for b in loader])
    assert len(features) == len(bank)
    assert effective_rank(features) == pytest.approx(evals[-1]["rankme"], rel=1e-3)


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "backbone.safetensors")


@pytest.mark.slow
def test_killed_mid_epoch_resumes_to_the_same_weights(covid_packed, tmp_path, capsys):
    args = ["--data", covid_packed, "--epochs", "2", "--log-every", "1", "--deterministic", *TINY]
    straight = tmp_path / "straight"
    assert pretrain(capsys, *args, "--out", straight).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "train/pretrain.py", *map(str, args), "--out", str(killed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # stop it in the middle of the first epoch (3 steps per epoch at batch 16)
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert "stopped (SIGTERM)" in out
    assert not (killed / "backbone.safetensors").exists()
    position = checkpoint.load(checkpoint.latest(killed))["position"]
    assert position["in_epoch"] > 0 or position["epoch"] > 0

    resumed = pretrain(capsys, *args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from ckpt-" in resumed.stdout
    steps = [
        json.loads(line)["step"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if "epoch_end" not in line
    ]
    assert steps == sorted(set(steps))  # nothing repeated
    a, b = _weights(straight), _weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain(
        capsys, "--data", covid_packed, "--out", out, "--epochs", "3", "--max-steps", "1", "--optimizer", "sgd", *TINY
    )
    assert first.returncode == 0, first.stderr[-2000:]
    before = checkpoint.latest(out)
    result = pretrain(
        capsys, "--data", covid_packed, "--out", out, "--epochs", "3", "--optimizer", "sgd", "--lr", "1e30", *TINY
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("pretrain: error: loss is") and "at step" in lines[-1]
    assert checkpoint.latest(out) == before


@pytest.mark.slow
def test_two_processes_on_gloo_then_resume_on_one(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_torchrun(
        "train/pretrain.py",
        *("--data", covid_packed, "--out", out, "--epochs", "1", *TINY),
        *("--projector", "64-64"),  # with a BN layer, which stays per-process on the CPU
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2  # really two processes
    resumed = pretrain(capsys, "--data", covid_packed, "--out", out, "--epochs", "2", *TINY, "--projector", "64-64")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from ckpt-" in resumed.stdout
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


def test_resume_with_another_architecture_is_one_line(covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(capsys, "--data", covid_packed, "--out", out, "--max-steps", "1", *TINY).returncode == 0
    changed = [a if a != "64" else "32" for a in TINY]  # another projector
    assert_one_line_error(
        pretrain(capsys, "--data", covid_packed, "--out", out, "--epochs", "2", *changed), "projector '64'", "'32'"
    )


def test_wandb_offline_run_and_disabled_without_wandb(covid_packed, tmp_path):
    out = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--wandb", "disabled")]
    args = ["--data", covid_packed, "--out", out, "--max-steps", "1", *tiny]
    result = pretrain_process(*args, "--wandb", "offline", env={"WANDB_API_KEY": "", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"

    no_wandb = "import sys; sys.modules['wandb'] = None; sys.argv[0] = 'train/pretrain.py'\n"
    code = no_wandb + "from twinray.train.pretrain import main; sys.exit(main(sys.argv[1:]))"
    base = [sys.executable, "-c", code, "--data", str(covid_packed), "--max-steps", "1", *tiny]
    disabled = subprocess.run(
        [*base, "--out", str(tmp_path / "d"), "--wandb", "disabled"], cwd=REPO, capture_output=True, text=True
    )
    assert disabled.returncode == 0, disabled.stderr[-2000:]
    missing = subprocess.run(
        [*base, "--out", str(tmp_path / "m"), "--wandb", "offline"], cwd=REPO, capture_output=True, text=True
    )
    assert_one_line_error(missing, "wandb is not installed", "--wandb disabled")


@pytest.mark.slow
def test_a_short_run_lowers_the_loss(demo_packed, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", demo_packed, "--out", out, "--epochs", "4", "--size", "32", "--batch-size", "32"]
    result = pretrain(capsys, *args, "--recipe", "base", "--wandb", "disabled")
    assert result.returncode == 0, result.stderr[-2000:]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "epoch_end" in line]
    assert len(epochs) == 4
    # Epoch means at 32 px (64 px until 2026-12-07, 104 s of CI): measured 459 -> 390 (435 -> 341 at 64 px).
    assert epochs[-1]["loss"] < 0.9 * epochs[0]["loss"]
    # The online probe starts from nothing and learns as the run goes (measured 0.27 -> 0.31 at 32 px, 0.25 -> 0.34
    # at 64 px; the majority class is 48% of train, so it is still short of the class prior). At the default
    # --eval-every (10), kNN runs at the last epoch only.
    assert epochs[-1]["probe_acc"] > epochs[0]["probe_acc"]
    assert ["knn_acc" in e for e in epochs] == [False, False, False, True]


def test_bf16_accumulation_lars_and_compile_run_on_the_cpu(covid_packed, tmp_path):
    out = tmp_path / "run"
    flags = ["--mixed-precision", "bf16", "--grad-accum", "2", "--optimizer", "lars", "--compile", "--max-steps", "3"]
    result = pretrain_process("--data", covid_packed, "--out", out, "--epochs", "2", "--log-every", "1", *TINY, *flags)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stopped (max_steps) at step 3" in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert (saved["mixed_precision"], saved["grad_accum"], saved["optimizer"], saved["compile"]) == (
        "bf16",
        2,
        "lars",
        True,
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if not r.get("epoch_end")] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.gpu
def test_cuda_run_compiles_in_bf16_and_resumes(demo_packed, tmp_path):
    """The command users come for, on a GPU with its CUDA defaults (compile on, bf16), then stop-and-resume."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    small = ["--data", demo_packed, "--size", "64", "--batch-size", "32", "--wandb", "disabled", "--log-every", "1"]
    out = tmp_path / "compiled"
    result = pretrain_process(*small, "--out", out, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((out / "config.json").read_text())
    assert saved["compile"] in (None, True) and saved["mixed_precision"] in ("auto", "bf16")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("epoch_end")]
    assert all(math.isfinite(r["loss"]) for r in steps) and steps[-1]["peak_memory_mb"] > 0
    assert (out / "backbone.safetensors").exists()

    out = tmp_path / "resumed"
    first = pretrain_process(*small, "--out", out, "--epochs", "2", "--no-compile", "--max-steps", "3")
    assert first.returncode == 0 and "stopped (max_steps) at step 3" in first.stdout, first.stderr[-2000:]
    second = pretrain_process(*small, "--out", out, "--epochs", "2", "--no-compile")
    assert second.returncode == 0, second.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    numbers = [r["step"] for r in rows if not r.get("epoch_end")]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) == 20  # 320 train / 32, two epochs


def test_a_reader_that_leaves_stops_the_run_quietly_after_saving_its_epoch(covid_packed, tmp_path, capsys):
    """`pretrain.py ... | head -0`: the first epoch line finds no reader. The epoch is saved before that line, the
    run exits as a shell expects for SIGPIPE (141) without a traceback, and a re-run finishes from there."""
    out = tmp_path / "run"
    # --cache none: auto's line saying which cache it chose would otherwise be the first line with no reader.
    args = ["--data", covid_packed, "--out", out, "--epochs", "2", "--cache", "none", *TINY]
    proc = subprocess.Popen([sys.executable, "train/pretrain.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait() == 141, stderr[-2000:]
    assert "Traceback" not in stderr and "Error" not in stderr
    position = checkpoint.load(checkpoint.latest(out))["position"]
    assert (position["epoch"], position["in_epoch"]) == (1, 0)
    resumed = pretrain(capsys, *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from ckpt-" in resumed.stdout and "epoch 1/2" not in resumed.stdout
    assert (out / "backbone.safetensors").exists()
