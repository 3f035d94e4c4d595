"""The other objectives in the trainer (--method simclr, moco, byol, vicreg): a short run of each, exact resume of
the momentum methods, their flag checks, and method sweeps in scans. Runs are in this process (train/pretrain.py's
train()), tiny (32 px, batch 16, 3 steps an epoch on the generated sample) and small-headed, to stay fast on CI."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import timm
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, assert_one_line_error, run_torchrun, twinray_here
from twinray.train import checkpoint
from twinray.train.config import PretrainConfig
from twinray.train.methods.base import unwrap
from twinray.train.scan import plan
from twinray.train.state import build_run
from twinray.train.step import Autocast, train_step

OTHERS = ("simclr", "moco", "byol", "vicreg")
# Small heads (the papers' are up to 8192 wide) and a queue of 4 batches: the defaults are for real runs.
SMALL = {
    "simclr": {"projector": "64-32"},
    "moco": {"projector": "64-32", "queue_size": 64},
    "byol": {"projector": "64-32", "predictor": "64-32"},
    "vicreg": {"projector": "64-64"},
}
TINY = dict(size=32, batch_size=16, workers=1, wandb="disabled", compile=False)


def train_here(data, out, method: str, **fields) -> dict:
    from twinray.train.pretrain import train

    cfg = PretrainConfig(data=str(data), out=str(out), method=method, **TINY, **SMALL[method], **fields)
    return train(cfg.validate())


def test_the_defaults_come_from_the_methods_table_and_flags_override_them():
    byol = PretrainConfig(method="byol").validate()
    assert (byol.projector, byol.predictor, byol.optimizer, byol.momentum, byol.warmup_epochs) == (
        "4096-256",
        "4096-256",
        "lars",
        0.996,
        10.0,
    )
    assert byol.lr == pytest.approx(0.1) and byol.lambd is None and byol.temperature is None
    assert PretrainConfig(method="simclr", batch_size=256).lr == pytest.approx(0.3)  # 0.3 x B/256
    moco = PretrainConfig(method="moco", lr=0.5, queue_size=4096).validate()
    assert (moco.lr, moco.queue_size, moco.temperature, moco.key_bn_chunk) == (0.5, 4096, 0.2, 32)
    vicreg = PretrainConfig(method="vicreg", cov_coeff=2.0).validate()
    assert (vicreg.sim_coeff, vicreg.std_coeff, vicreg.cov_coeff, vicreg.projector) == (25, 25, 2.0, "8192-8192-8192")


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize(
    "fields, name",
    [
        ({"method": "barlow", "lambd": None}, "lambd"),
        ({"method": "simclr", "temperature": None}, "temperature"),
        ({"method": "vicreg", "sim_coeff": None}, "sim_coeff"),
        ({"method": "vicreg", "cov_coeff": None}, "cov_coeff"),
        ({"lr": None}, "lr"),
        ({"weight_decay": None}, "weight_decay"),
        ({"warmup_epochs": None}, "warmup_epochs"),
    ],
)
def test_a_number_that_is_not_finite_is_refused_before_the_run(fields, name, value):
    """inf and NaN (from a flag or YAML's .inf/.nan) are a one-line ConfigError naming the field, not a run that
    dies at its first step with the loss inf or NaN (the `positive`/`non_negative` checks let them through)."""
    from twinray.train.config import ConfigError, FinetuneConfig

    cfg = PretrainConfig(**{**fields, name: value})
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number"):
        cfg.validate()
    if name in ("lr", "weight_decay"):
        finetune = FinetuneConfig(data="d", init="random", out="o", **{name: value})
        with pytest.raises(ConfigError, match="must be a finite number above 0 and --weight-decay"):
            finetune.validate()


@pytest.mark.parametrize("method", OTHERS)
def test_a_fixed_batch_lowers_each_methods_loss(method, covid_packed):
    """The trainer's step with the method's defaults (optimizer, lr at batch 16, temperature, momentum, ...; no
    warm-up, small heads) on one batch of the sample, repeated: the loss goes down. MoCo's queue is put back after
    each step, else the batch's own earlier keys fill it as negatives and the loss rises."""
    from twinray.pipelines import LoaderSettings, build_loader

    with build_loader(str(covid_packed), LoaderSettings(split="train", batch_size=16, size=32, workers=1)) as loader:
        loader.set_epoch(0)
        batch = next(iter(loader))
        classes = len(loader.data.classes)
    cfg = PretrainConfig(method=method, epochs=1, batch_size=16, warmup_epochs=0, **SMALL[method]).validate()
    torch.manual_seed(0)
    run = build_run(cfg, torch.device("cpu"), steps_per_epoch=20, classes=classes, multilabel=False)
    queue = run.model.queue
    start = {k: v.clone() for k, v in queue.state_dict().items()} if queue is not None else None
    losses = []
    for _ in range(8):
        figures = train_step(run.model, run.method, batch.views, run.optimizer, probe=run.probe, labels=batch.labels)
        run.scheduler.step()
        losses.append(float(figures["loss"]))
        if queue is not None:
            queue.load_state_dict(start)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("method", OTHERS)
def test_a_short_run_logs_evaluates_and_exports_a_timm_backbone(method, covid_packed, tmp_path):
    """One epoch through the whole trainer: the method's terms are logged, kNN and the probe run, and the backbone
    (the online encoder) loads into timm and equals the model's own backbone in the checkpoint."""
    out = tmp_path / method
    train_here(covid_packed, out, method, epochs=1, log_every=1, eval_every=1, knn_bank=40)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("epoch_end")]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    terms = {"simclr": "positive_similarity", "moco": "positive_similarity", "byol": "cosine", "vicreg": "variance"}
    assert terms[method] in steps[-1] and "probe_acc" in steps[-1]
    assert "knn_acc" in rows[-1]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == method and config["lambd"] is None
    info = json.loads((out / "backbone.json").read_text())
    backbone = timm.create_model(info["timm_name"], num_classes=0, in_chans=info["in_chans"])
    exported = load_file(out / "backbone.safetensors")
    backbone.load_state_dict(exported)
    backbone.eval()
    assert backbone(torch.rand(1, 1, 32, 32)).shape == (1, info["num_features"])
    model = checkpoint.load(checkpoint.latest(out))["model"]
    assert all(torch.equal(v, model[f"backbone.{k}"]) for k, v in exported.items())  # the online encoder


def sigterm_after_first_step(out) -> threading.Thread:
    """A thread that sends this process SIGTERM once the run in `out` has logged its first step: what a scheduler
    does to a job. train()'s handler, installed before the first step, turns it into a checkpoint and a stop."""

    def watch():
        metrics = out / "metrics.jsonl"
        for _ in range(12000):  # 2 minutes at most
            if metrics.exists() and metrics.read_text().count("\n") >= 1:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("method", ["moco", "byol"])
@pytest.mark.parametrize("stop", ["SIGTERM", "max_steps"])
def test_a_stopped_momentum_run_resumes_to_the_same_weights(method, stop, covid_packed, tmp_path):
    """Stopped mid-run (by SIGTERM after its first step, as Barlow Twins' test does in a subprocess, or by
    --max-steps in the middle of its second epoch), then resumed: every tensor of the model (online weights, the
    EMA weights, MoCo's queue and pointer, BatchNorm statistics) equals an uninterrupted run's, bit for bit."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_here(covid_packed, straight, method, epochs=2, log_every=1)
    if stop == "SIGTERM":
        watcher = sigterm_after_first_step(stopped)
        summary = train_here(covid_packed, stopped, method, epochs=2, log_every=1)
        watcher.join()
        assert summary["stopped"] == "SIGTERM" and 1 <= summary["step"] < 6, summary
    else:
        summary = train_here(covid_packed, stopped, method, epochs=2, log_every=1, max_steps=4)
        assert summary == {"stopped": "max_steps", "step": 4}
    assert not (stopped / "backbone.safetensors").exists()
    train_here(covid_packed, stopped, method, epochs=2, log_every=1)
    a = checkpoint.load(checkpoint.latest(straight))
    b = checkpoint.load(checkpoint.latest(stopped))
    assert a["position"] == b["position"] == {"step": 6, "epoch": 2, "in_epoch": 0}
    assert a["model"].keys() == b["model"].keys()
    assert any(k.startswith("target.") for k in a["model"]) and (method != "moco" or "queue.keys" in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    if method == "moco":  # the queue has moved: 6 global batches of 16 in a queue of 64
        assert int(a["model"]["queue.ptr"]) == 6 * 16 % 64
    assert all(torch.equal(v, load_file(stopped / "backbone.safetensors")[k]) for k, v in _backbone(straight).items())


def _backbone(run) -> dict[str, torch.Tensor]:
    return load_file(run / "backbone.safetensors")


def test_byol_momentum_follows_the_schedule_position_and_skips_accumulation_steps():
    """BYOL's EMA rate comes from the scheduler's step count (restored on resume), and a micro-step of gradient
    accumulation, which leaves the weights as they are, moves no EMA either."""
    cfg = PretrainConfig(method="byol", epochs=2, batch_size=4, **SMALL["byol"]).validate()
    torch.manual_seed(0)
    run = build_run(cfg, torch.device("cpu"), steps_per_epoch=5, classes=3, multilabel=False)
    assert run.method.current_momentum() == pytest.approx(0.996)
    run.scheduler.last_epoch = 2  # two updates done
    assert run.method.current_momentum() == pytest.approx(1 - 0.004 * (math.cos(math.pi * 2 / 10) + 1) / 2)
    views = [torch.rand(4, 1, 32, 32), torch.rand(4, 1, 32, 32)]
    target = {k: v.clone() for k, v in run.model.target.state_dict().items()}
    out = run.method(run.model, views)  # a forward and backward with no optimizer step: an accumulation step
    out.loss.backward()
    run.method.after_update(run.model)
    after = run.model.target.state_dict()
    assert all(torch.equal(target[k], after[k]) for k in target if "running" not in k and "num_batches" not in k)
    run.optimizer.step()
    run.method.after_update(run.model)
    moved = run.model.target.module.backbone.conv1.weight
    assert not torch.equal(moved, target["module.backbone.conv1.weight"])
    assert unwrap(Autocast(run.model, None)) is run.model  # what after_update reaches through


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_two_processes_on_gloo_train_a_momentum_method(method, covid_packed, tmp_path):
    """DDP wraps the model with its momentum encoder (no gradient), predictor and queue without
    find_unused_parameters; MoCo's queue takes the keys of both processes (the pointer moves by the global
    batch: 3 steps x 16 keys, not 3 x 8)."""
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, **SMALL[method]}.items() if k != "compile"]
    result = run_torchrun(
        "train/pretrain.py", "--method", method, "--data", covid_packed, "--out", out, "--epochs", "1", *flags
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    model = checkpoint.load(checkpoint.latest(out))["model"]
    if method == "moco":
        assert int(model["queue.ptr"]) == 3 * 16
    assert (out / "backbone.safetensors").exists()


def test_a_bad_method_is_one_line_listing_the_choices(tmp_path, capsys):
    args = ["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--method", "dino"]
    result = twinray_here(capsys, "pretrain", *args)
    assert_one_line_error(result, "method 'dino'", "barlow, simclr, moco, byol, vicreg")


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--method", "simclr", "--lambd", "0.01"], ["--lambd does not apply to --method simclr", "barlow"]),
        (["--temperature", "0.5"], ["--temperature does not apply to --method barlow", "simclr, moco"]),
        (["--method", "byol", "--queue-size", "4096"], ["--queue-size does not apply to --method byol"]),
        (["--method", "vicreg", "--predictor", "64"], ["--predictor does not apply to --method vicreg"]),
        (["--method", "moco", "--queue-size", "64"], ["queue_size 64", "--batch-size 128"]),
        (["--method", "byol", "--predictor", "64-32"], ["predictor '64-32'", "256"]),
    ],
)
def test_a_flag_that_does_not_apply_is_one_line(args, needles, tmp_path, capsys):
    result = twinray_here(capsys, "pretrain", "--data", tmp_path, "--out", tmp_path / "run", *args)
    assert_one_line_error(result, *needles)


def test_a_yaml_field_that_does_not_apply_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: simclr\ntemperature: 0.5\nmomentum: 0.99\n")
    result = twinray_here(capsys, "pretrain", "--config", config, "--data", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(result, "--momentum does not apply to --method simclr")


def test_resuming_another_method_is_refused(tmp_path):
    from twinray.train.config import ConfigError
    from twinray.train.state import Position, part, resume_changes, saved_parts, settings

    def now(method):
        return part(0, "d", 1, 1, settings(PretrainConfig(method=method), "ab" * 32, "no"))

    saved = saved_parts({"config": PretrainConfig(method="byol").to_dict(), "position": {"step": 3}})[-1]
    assert resume_changes("run", saved, now("byol"), Position()) == {}
    with pytest.raises(ConfigError, match=r"^run holds a run with other settings: method 'byol', now 'moco'; "):
        resume_changes("run", saved, now("moco"), Position())
    old = {k: v for k, v in PretrainConfig().to_dict().items() if k != "method"}  # a checkpoint from before
    assert (
        resume_changes("run", saved_parts({"config": old, "position": {"step": 3}})[-1], now("barlow"), Position())
        == {}
    )


def test_a_scan_plans_one_pretraining_per_method():
    cfg = {"data": "d", "out": "o", "seeds": [0, 1], "pretrain": {"epochs": 1}, "finetune": {"epochs": 1},
           "grid": {"method": ["barlow", "simclr", "moco", "byol", "vicreg"], "fraction": [0.1, 1.0]},
           "then": ["linear"]}  # fmt: skip
    runs = plan(cfg)
    pretrains = [r for r in runs if r["kind"] == "pretrain"]
    assert len(pretrains) == 5 * 2 and len([r for r in runs if r["kind"] == "finetune"]) == 5 * 2 * 2
    for run in pretrains:
        method = run["cell"]["method"]
        assert run["config"].method == method
        assert run["args"][run["args"].index("--method") + 1] == method
        assert "--lr" not in run["args"]  # the method's own default, filled when the run reads its flags
    byol = next(r for r in pretrains if r["cell"]["method"] == "byol")
    assert (byol["config"].optimizer, byol["config"].predictor) == ("lars", "4096-256")


def test_the_methods_scan_config_plans(tmp_path):
    import yaml

    from twinray.train.scan import load_config

    cfg = load_config(REPO / "configs" / "scan-methods.yaml")
    assert cfg["grid"]["method"] == ["barlow", "simclr", "moco", "byol", "vicreg"]
    runs = plan(cfg)
    assert len([r for r in runs if r["kind"] == "pretrain"]) == 5 * len(cfg["seeds"])
    assert yaml.safe_load((REPO / "configs" / "scan-methods.yaml").read_text())["then"] == ["linear", "full"]


def test_train_speed_reports_each_method(tmp_path, monkeypatch, capsys):
    """bench/train_speed.py --methods: one row per method at its defaults (MoCo's key encoder and queue, BYOL's
    target and predictor), each with its images/s and peak memory, the device named."""
    from twinray.bench import report
    from twinray.bench.train_speed import main

    monkeypatch.setattr(report, "RESULTS", tmp_path / "record")
    out = tmp_path / "speed.json"
    args = ["--device", "cpu", "--methods", "barlow,moco,byol", "--configs", "a", "--size", "32", "--batch-sizes", "16"]
    assert main([*args, "--steps", "1", "--warmup", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"].startswith("cpu: ")
    assert [r["method"] for r in result["results"]] == ["barlow", "moco", "byol"]
    assert all(r["images_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in result["results"])
    speed = {r["method"]: r["images_per_s"] for r in result["results"]}
    ratio = result["ratios"]["byol_over_barlow_a_synthetic_b16"]  # a ratio within the run, against Barlow Twins
    assert ratio == pytest.approx(speed["byol"] / speed["barlow"], abs=0.01)
    assert main(["--methods", "dino"]) == 2 and "unknown dino" in capsys.readouterr().err
