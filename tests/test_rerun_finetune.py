"""Fine-tuning into a finished --out, one writer per --out, and class names that travel with a model (issue 18).

The data: tiny generated packed datasets whose classes are named, each class one picture (a bright square at a
place of its own), so a class looks the same whichever its number in a dataset."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, assert_one_line_error, twinray_here
from twinray import lock
from twinray.cli import InputError
from twinray.prep.format import PackedDataset, PackWriter, encode_image
from twinray.train import finetune, gradcam, transfer

PLACE = {"A": (4, 4), "B": (36, 36), "C": (4, 36)}  # where each class's square sits in a 64 x 64 image
COUNTS = {"train": 16, "val": 8, "test": 4}  # per class
TINY = ["--init", "random", "--mode", "linear", "--epochs", "1", "--size", "32", "--batch-size", "8",
        "--workers", "1", "--device", "cpu"]  # fmt: skip


def pack(out: Path, classes: list[str]) -> Path:
    """A packed multiclass dataset of `classes` (label = the class's position in `classes`)."""
    rng = np.random.default_rng(len(classes))
    writer = PackWriter(out, "named", "multiclass", classes, "png", 64, shard_samples=64)
    for split, n in COUNTS.items():
        for _ in range(n):
            for label, name in enumerate(classes):
                image = rng.integers(0, 60, (64, 64), dtype=np.uint8)
                y, x = PLACE[name]
                image[y : y + 24, x : x + 24] = 220
                writer.add(split, encode_image(image, "png"), 64, 64, {"label": label})
    writer.finish({"skipped": []})
    return out


@pytest.fixture(scope="module")
def named(tmp_path_factory) -> dict:
    """Datasets {"AB", "B", "BA", "ABC"} and "run": a finished tiny run on AB (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("named")
    found = {"".join(c): pack(root / "".join(c), c) for c in (["A", "B"], ["B"], ["B", "A"], ["A", "B", "C"])}
    found["run"] = root / "ft-ab"
    assert finetune.main(["--data", str(found["AB"]), *TINY, "--out", str(found["run"])]) == 0
    return found


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_finished_run_is_kept_and_only_force_replaces_it(named, tmp_path, capsys):
    out = tmp_path / "ft"
    shutil.copytree(named["run"], out)
    before = snapshot(out)
    assert set(before) == {"results.json", "model.safetensors", "model.json", "confusion.png", "train.log"}
    moved = tmp_path / "elsewhere"  # the same data at another path is the same data
    shutil.copytree(named["AB"], moved)
    capsys.readouterr()
    assert finetune.main(["--data", str(moved), *TINY, "--out", str(out)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line == f"--out {out} already holds this finished run: {out / 'results.json'} (--force runs it again)"
    assert snapshot(out) == before
    # Other settings: one line naming each, with both values, exit 2, and the files as they were.
    other = twinray_here(capsys, "finetune", "--data", named["B"], *TINY, "--mode", "full", "--out", out)
    sha = {name: PackedDataset(named[name]).digest[:12] for name in ("AB", "B")}
    assert_one_line_error(
        other,
        f"--out {out} holds a finished run with other settings: ",
        f"data was {named['AB']} (manifest sha256 {sha['AB']}), now {named['B']} (manifest sha256 {sha['B']}); ",
        "mode was 'linear', now 'full'; use another --out, or --force",
    )
    assert snapshot(out) == before
    assert finetune.main(["--data", str(moved), *TINY, "--out", str(out), "--seed", "1", "--force"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seed"] == 1 and results["config"]["data"] == str(moved)
    assert results["data_sha256"] == PackedDataset(named["AB"]).digest
    assert (out / "model.safetensors").read_bytes() != before["model.safetensors"]


def test_a_second_finetune_on_one_out_is_refused_before_it_writes(named, tmp_path):
    out = tmp_path / "ft"
    with lock.exclusive(out, "fine-tuning"):
        with pytest.raises(InputError, match=f"^{out}: another fine-tuning is writing to it now"):
            finetune.main(["--data", str(named["AB"]), *TINY, "--out", str(out)])
    assert not out.exists()


def test_an_unfinished_run_resumes_on_the_same_data_by_content_not_path(named, tmp_path, capsys):
    """`| head -0` stops a run after its first epoch's checkpoint (test_finetune's reader test): an unfinished run."""
    data, out = tmp_path / "data", tmp_path / "ft"
    shutil.copytree(named["AB"], data)
    args = ["--data", str(data), *TINY, "--epochs", "2", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "train/finetune.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    proc.stdout.close()
    assert proc.wait() == 141, proc.stderr.read()[-2000:]
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-000000001"]
    manifest = (data / "manifest.json").read_bytes()
    (data / "manifest.json").write_bytes(manifest + b"\n")  # other content at the same path (as a re-pack)
    changed = PackedDataset(data).digest[:12]
    with pytest.raises(InputError, match=rf"holds an unfinished run with other settings: data was {data} .*now {data} "
                       rf"\(manifest sha256 {changed}\); use another --out, or --force"):  # fmt: skip
        finetune.main(args)
    (data / "manifest.json").write_bytes(manifest)
    moved = tmp_path / "moved"
    data.rename(moved)
    capsys.readouterr()
    assert finetune.main(["--data", str(moved), *args[2:]]) == 0
    assert f"resuming {out} after epoch 1" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert len(results["history"]) == 2 and not list(out.glob("ckpt-*"))


def test_all_differing_settings_are_named():
    before = {"config": {"data": "/a", "mode": "full", "seed": 0, "lr": 0.1}, "data_sha256": "1" * 64}
    now = {"config": {"data": "/b", "mode": "linear", "seed": 0, "lr": 0.2}, "data_sha256": "1" * 64}
    assert finetune.differences(before, now, ("data", "mode", "seed", "lr")) == [
        "mode was 'full', now 'linear'",
        "lr was 0.1, now 0.2",
    ]
    old = {"config": before["config"]}  # a record from before the sha256 was kept: the path decides
    assert finetune.differences(old, now, ("data",)) == ["data was '/a', now '/b'"]


def test_gradcam_matches_classes_by_name(named, tmp_path, capsys):
    """A model of [A, B] drawn on data holding only B: each image is "true: B" with the map of the model's B."""
    png = tmp_path / "cam.png"
    assert (
        gradcam.main(["--data", str(named["B"]), "--models", str(named["run"]), "--per-class", "2", "--out", str(png)])
        == 0
    )
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["true"] == ["B", "B"]
    (drawn,) = record["models"]
    assert drawn["classes"] == ["A", "B"] and drawn["targets"] == [1, 1]
    assert set(drawn["predicted"]) <= {"A", "B"} and len(drawn["predicted"]) == 2
    assert png.stat().st_size > 1000
    # Data whose classes are [B, A]: A's images map output 0, B's output 1, in the model's order of classes.
    args = argparse.Namespace(data=named["BA"], models=[named["run"]], size=None, per_class=1, out=tmp_path / "ba.png")
    record = gradcam.run(args)
    assert record["true"] == ["A", "B"] and record["models"][0]["targets"] == [0, 1]
    unknown = twinray_here(
        capsys, "gradcam", "--data", named["ABC"], "--models", named["run"], "--out", tmp_path / "c.png"
    )
    assert_one_line_error(
        unknown, f"--models {named['run']}: the data's class 'C' is not among the model's classes (A, B)"
    )
    assert not (tmp_path / "c.png").exists()


def test_a_finetuned_init_brings_its_head_matched_by_class_name(named, tmp_path):
    backbone, info = transfer.load_backbone(str(named["run"]))
    assert info["classes"] == ["A", "B"] and info["task"] == "multiclass"
    weights = load_file(named["run"] / "model.safetensors")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, weights[f"backbone.{k}"]), k
    head = transfer.classifier_head(info, ["B", "A"], "multiclass")
    assert torch.equal(head["1.weight"], weights["head.1.weight"][[1, 0]])
    assert torch.equal(head["1.bias"], weights["head.1.bias"][[1, 0]])
    assert torch.equal(head["0.running_mean"], weights["head.0.running_mean"])
    # Fine-tuned on [B, A] data at a negligible lr, the model keeps the init's head, rows swapped by name.
    out = tmp_path / "ft-ba"
    args = ["--data", str(named["BA"]), *TINY, "--init", str(named["run"]), "--lr", "1e-12", "--out", str(out)]
    assert finetune.main(args) == 0
    tuned = load_file(out / "model.safetensors")
    assert torch.allclose(tuned["head.1.weight"], weights["head.1.weight"][[1, 0]], atol=1e-9)
    assert json.loads((out / "model.json").read_text())["classes"] == ["B", "A"]
    with pytest.raises(transfer.TransferError, match=r"the data's class 'C' is not among the model's classes \(A, B\)"):
        finetune.main(["--data", str(named["ABC"]), *TINY, "--init", str(named["run"] / "model.safetensors"),
                       "--out", str(tmp_path / "ft-abc")])  # fmt: skip
    assert not (tmp_path / "ft-abc").exists()
