"""Pretraining re-run on an existing --out: it resumes only the same data (by content) and learned settings, says
what it allows to change, records every part of the run with its steps, refuses a second writer, and --force starts
over. Every refusal is one line, exit 2, with every file in --out byte-identical (docs/pretrain.md)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest

from tests.conftest import twinray_here
from twinray.lock import exclusive, lock_path
from twinray.prep.format import PackedDataset, PackWriter, encode_image
from twinray.train.config import PRETRAIN_FIXED, PRETRAIN_LEARNED, PRETRAIN_RUNS, PretrainConfig

# 16 train images at batch 4: 4 steps an epoch. A 16-wide projector, no compile: a step takes a fraction of a second.
BASE = {"size": 32, "batch_size": 4, "projector": "16", "wandb": "disabled", "workers": 1, "knn_bank": 8}
FLAGS = ["--no-compile"]


def make_data(out, classes: int, seed: int = 0):
    """A packed dataset of 16 train and 4 val random 40x40 images in `classes` classes."""
    rng = np.random.default_rng(seed)
    writer = PackWriter(out, "tiny", "multiclass", [f"c{i}" for i in range(classes)], "png", 64, shard_samples=64)
    for split, n in (("train", 16), ("val", 4)):
        for k in range(n):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            writer.add(split, encode_image(image, "png"), 40, 40, {"label": k % classes})
    writer.finish({"skipped": []})
    return out


def args(data, out, **changes) -> list[str]:
    """pretrain's flags: BASE with `changes` (None drops a flag), then FLAGS."""
    fields = {**BASE, "data": data, "out": out, **changes}
    flags = [x for k, v in fields.items() if v is not None for x in (f"--{k.replace('_', '-')}", str(v))]
    return [*flags, *FLAGS]


def pretrain(capsys, *argv) -> subprocess.CompletedProcess:
    """`twinray pretrain ARGV` in this process (tests/conftest.py twinray_here): its exit code, stdout and stderr."""
    return twinray_here(capsys, "pretrain", *argv)


def tree(path) -> dict[str, str] | None:
    """Every file under `path` by its relative name, with its sha256; None if `path` does not exist."""
    if not path.exists():
        return None
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


def refused(result, out, before, line: str) -> None:
    """Exit 2, exactly `line` on stderr and nothing else, nothing in `out` changed."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"pretrain: error: {line}"], result.stderr
    assert tree(out) == before


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("two") / "data", classes=2)


@pytest.fixture(scope="module")
def stopped(two, tmp_path_factory):
    """A run of --epochs 3 stopped by --max-steps 6: epoch 1, 2 steps into it (read-only: copy it)."""
    from twinray.train.pretrain import main

    out = tmp_path_factory.mktemp("stopped") / "run"
    assert main(args(two, out, epochs=3, max_steps=6)) == 0
    return out


def copy_run(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def test_every_pretrain_field_either_changes_what_is_learned_or_how_the_run_runs():
    names = {f.name for f in dataclasses.fields(PretrainConfig)}
    assert set(PRETRAIN_LEARNED) | set(PRETRAIN_RUNS) == names
    assert not set(PRETRAIN_LEARNED) & set(PRETRAIN_RUNS)
    assert set(PRETRAIN_FIXED) <= set(PRETRAIN_LEARNED)


HINT = ", --force to start over, or use another --out"


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"size": 48, "batch_size": 2, "recipe": "base"},
            "size 32, now 48; batch_size 4, now 2; recipe 'seed-final', now 'base'; resume with the same settings, "
            "--allow-change size,batch_size,recipe to change them anyway" + HINT,
        ),
        (
            {"lambd": 0.01, "seed": 3, "weight_decay": 0, "grad_accum": 2, "knn_k": 5},
            "weight_decay 1e-05, now 0.0; grad_accum 1, now 2; seed 0, now 3; lambd 0.005, now 0.01; knn_k 20, now 5; "
            "resume with the same settings, --allow-change weight_decay,grad_accum,seed,lambd,knn_k to change them "
            "anyway" + HINT,
        ),
        ({"projector": "32"}, "projector '16', now '32'; resume with the same settings" + HINT),
        ({"epochs": 1}, "epochs 3, now 1, fewer than the 2 it has begun; resume with the same settings" + HINT),
        (
            {"epochs": 2},
            "epochs 3, now 2; resume with the same settings, --allow-change epochs to change them anyway" + HINT,
        ),
        (
            {"batch_size": 8, "allow_change": "batch_size"},
            "batch_size 4, now 8, mid-epoch (it may change only at an epoch's end); resume with the same settings"
            + HINT,
        ),
    ],
    ids=["size-batch-recipe", "method-fields", "projector", "fewer-epochs-than-begun", "fewer-epochs", "mid-epoch"],
)
def test_a_rerun_with_other_settings_is_one_line_naming_each_and_changes_nothing(
    changes, words, two, stopped, tmp_path, capsys
):
    out = copy_run(stopped, tmp_path)
    before = tree(out)
    result = pretrain(capsys, *args(two, out, **{"epochs": 3, **changes}))
    refused(result, out, before, f"{out} holds a run with other settings: {words}")


def test_another_dataset_with_three_classes_is_one_line_not_a_traceback(two, stopped, tmp_path, capsys):
    three = make_data(tmp_path / "three", classes=3)
    out = copy_run(stopped, tmp_path)
    before = tree(out)
    old, new = PackedDataset(two).digest[:16], PackedDataset(three).digest[:16]
    result = pretrain(capsys, *args(three, out, epochs=3, size=48))
    line = f"{out} holds a run with other settings: data {old}, now {new} (manifest sha256); size 32, now 48; "
    refused(result, out, before, line + "resume with the same settings" + HINT)


def test_data_is_known_by_content_repacked_is_refused_and_moved_resumes(two, stopped, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(two, data)  # the same content at another path: the same data
    out = copy_run(stopped, tmp_path)
    moved = pretrain(capsys, *args(data, out, epochs=3, max_steps=7))
    assert moved.returncode == 0, moved.stderr
    assert "resuming from ckpt-000000006: epoch 1, step 2 of 4" in moved.stdout
    parts = json.loads((out / "config.json").read_text())["parts"]
    assert [(p["steps"], p["data"]) for p in parts] == [([0, 6], str(two)), ([6, 7], str(data))]
    assert parts[0]["data_digest"] == parts[1]["data_digest"] == PackedDataset(two).digest

    shutil.rmtree(data)
    make_data(data, classes=2, seed=1)  # re-packed at the same path: other data
    before = tree(out)
    result = pretrain(capsys, *args(data, out, epochs=3))
    old, new = PackedDataset(two).digest[:16], PackedDataset(data).digest[:16]
    line = f"{out} holds a run with other settings: data {old}, now {new} (manifest sha256); "
    refused(result, out, before, line + "resume with the same settings" + HINT)


def test_allowed_changes_resume_say_so_and_every_part_is_recorded(two, tmp_path, capsys):
    out = tmp_path / "run"
    first = pretrain(capsys, *args(two, out, epochs=1))
    assert first.returncode == 0, first.stderr
    with open(out / "metrics.jsonl", "a") as f:  # a line past the checkpoint, as a run killed after it leaves
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")

    longer = pretrain(capsys, *args(two, out, epochs=2, lr=0.001))
    assert longer.returncode == 0, longer.stderr
    lines = longer.stdout.splitlines()
    assert lines[lines.index("resuming from ckpt-000000004: epoch 1, step 0 of 4") + 1] == (
        "changed since the checkpoint: epochs 1 -> 2, lr 0.002 -> 0.001 (config.json records each part)"
    )
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 4, 8, 8]  # each epoch's last step and its epoch line; step 5 of the killed run is gone

    bigger = pretrain(capsys, *args(two, out, epochs=3, lr=0.001, size=48, allow_change="size"))
    assert bigger.returncode == 0, bigger.stderr
    assert "changed since the checkpoint: size 32 -> 48, epochs 2 -> 3 (config.json records each part)" in (
        bigger.stdout
    )
    config = json.loads((out / "config.json").read_text())
    backbone = json.loads((out / "backbone.json").read_text())
    expected = [
        {"steps": [0, 4], "epochs": 1, "lr": 0.002, "size": 32},
        {"steps": [4, 8], "epochs": 2, "lr": 0.001, "size": 32},
        {"steps": [8, 12], "epochs": 3, "lr": 0.001, "size": 48},
    ]
    digest = PackedDataset(two).digest
    for record in (config, backbone):
        assert [{k: p[k] for k in expected[0]} for p in record["parts"]] == expected
        assert all(
            p["data_digest"] == digest and p["world_size"] == 1 and p["projector"] == "16" for p in record["parts"]
        )
        assert record["data_digest"] == digest
    assert (config["epochs"], config["size"], config["lr"]) == (3, 48, 0.001)

    before = tree(out)
    again = pretrain(capsys, *args(two, out, epochs=3, lr=0.001, size=48, allow_change="size"))
    assert again.returncode == 0 and again.stderr == ""
    assert again.stdout == (
        f"{out} is already done: 3 epochs, 12 steps; nothing changed (a larger --epochs continues it, --force starts "
        "over)\n"
    )
    assert tree(out) == before


def test_a_second_launch_on_the_same_out_is_refused_while_one_holds_it(two, stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    fresh = tmp_path / "fresh"
    for target in (out, fresh):
        before = tree(target)
        with exclusive(target, "pretraining"):  # a real lock, as another launch holds it
            result = pretrain(capsys, *args(two, target, epochs=3))
        line = (
            f"{target}: another pretraining is writing to it now (lock {lock_path(target)}); wait for it to finish "
            "or use another --out"
        )
        refused(result, target, before, line)
    assert not fresh.exists()


def test_force_discards_the_run_and_starts_over_leaving_other_files(two, stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    (out / "notes.txt").write_text("mine")
    result = pretrain(capsys, *args(two, out, epochs=3, size=48, max_steps=1, log_every=1), "--force")
    assert result.returncode == 0, result.stderr
    assert (
        f"--force: discarded ckpt-000000004, ckpt-000000006, config.json, curves.png, metrics.jsonl, train.log from "
        f"{out}; starting over" in result.stdout
    )
    assert "resuming" not in result.stdout
    kept = ["ckpt-000000001", "config.json", "curves.png", "metrics.jsonl", "notes.txt", "train.log"]
    assert sorted(p.name for p in out.iterdir()) == kept
    assert (out / "notes.txt").read_text() == "mine"
    parts = json.loads((out / "config.json").read_text())["parts"]
    assert [(p["steps"], p["size"]) for p in parts] == [([0, 1], 48)]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_backbone_without_a_checkpoint_is_not_replaced(two, stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    for ckpt in out.glob("ckpt-*"):
        shutil.rmtree(ckpt)
    (out / "backbone.safetensors").write_bytes(b"weights")
    before = tree(out)
    result = pretrain(capsys, *args(two, out, epochs=3))
    line = (
        f"{out} holds a finished backbone but no checkpoint to resume from: --force to discard it and start over, "
        "or use another --out"
    )
    refused(result, out, before, line)


@pytest.mark.parametrize(
    "names, line",
    [
        ("sise", "--allow-change 'sise' is not a setting; the ones it may name: size, batch_size, recipe, epochs"),
        (
            "size,method",
            "--allow-change method: a checkpoint continues only with the same method; use --force to start over, "
            "or another --out",
        ),
    ],
)
def test_allow_change_names_only_settings_that_may_change(names, line, two, stopped, tmp_path, capsys):
    out = copy_run(stopped, tmp_path)
    before = tree(out)
    result = pretrain(capsys, *args(two, out, epochs=3, allow_change=names))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"pretrain: error: {line}"), result.stderr
    assert tree(out) == before


@pytest.mark.slow
def test_every_process_of_a_refused_torchrun_launch_stops_with_the_line(two, tmp_path):
    """Two gloo processes: rank 0 is refused the lock and tells rank 1, so both stop at once with the same line (no
    process waits in a collective for one that left); nothing is written."""
    from tests.conftest import run_torchrun

    out = tmp_path / "run"
    with exclusive(out, "pretraining"):
        result = run_torchrun("train/pretrain.py", *args(two, out, epochs=1), timeout=240)
    line = (
        f"pretrain: error: {out}: another pretraining is writing to it now (lock {lock_path(out)}); wait for it to "
        "finish or use another --out"
    )
    assert result.returncode != 0
    assert [x for x in result.stderr.splitlines() if x.startswith("pretrain: error:")] == [line, line], result.stderr
    assert not out.exists()
