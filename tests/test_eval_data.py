"""Pretraining on an unlabeled dataset, and watching another, labelled one (`--eval-data`): the kNN bank is its train
split and the score its val split, the probe trains on its train split as a side stream; bad eval sets are one line
each; scans pretrain on one dataset and fine-tune on another (docs/pretrain.md, "Evaluating on another dataset")."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import run_torchrun, twinray_here
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep.format import LABEL_NONE, PackedDataset, PackWriter, encode_image
from twinray.train.online_eval import NO_LABELS, LinearProbe, knn_metrics, knn_scores
from twinray.train.pretrain import knn_bank_rows

TINY = ["--size", "32", "--batch-size", "8", "--projector", "16", "--wandb", "disabled", "--workers", "1"]
TINY += ["--no-compile", "--knn-bank", "40", "--probe-batch", "8"]


def make_unlabeled(out, n_train: int = 24, n_val: int = 0, seed: int = 0):
    """An unlabeled packed dataset (task none) of random 40x40 images, as `prep images` writes one."""
    rng = np.random.default_rng(seed)
    writer = PackWriter(out, "u", "none", [], encoding="png", size=32, shard_samples=64)
    for split, n in (("train", n_train), ("val", n_val)):
        for _ in range(n):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            writer.add(split, encode_image(image, "png"), 40, 40, {})
    writer.finish({"skipped": []})
    return out


def make_labelled(out, splits=(("train", 16), ("val", 4)), classes=("a", "b"), size: int = 32):
    rng = np.random.default_rng(1)
    writer = PackWriter(out, "l", "multiclass", list(classes), encoding="png", size=size, shard_samples=64)
    for split, n in splits:
        for k in range(n):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            writer.add(split, encode_image(image, "png"), 40, 40, {"label": k % len(classes)})
    writer.finish({"skipped": []})
    return out


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    return make_unlabeled(tmp_path_factory.mktemp("unlabeled") / "u")


def pretrain(capsys, *argv) -> subprocess.CompletedProcess:
    """`twinray pretrain ARGV` in this process (tests/conftest.py twinray_here)."""
    return twinray_here(capsys, "pretrain", *argv)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line(result, *needles) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def knn_of_backbone(out, eval_dir) -> dict:
    """The kNN figures of `out`'s exported backbone on `eval_dir` (bank: up to 40 train rows; queries: val), with
    the score matrix's class count."""
    eval_set = PackedDataset(eval_dir)
    backbone = timm.create_model("resnet18", num_classes=0, in_chans=1)
    backbone.load_state_dict(load_file(out / "backbone.safetensors"))
    backbone.eval()
    kw = dict(batch_size=8, device="cpu", recipe=EVAL_RECIPE, size=32, views=1, drop_last=False)
    with torch.no_grad():
        bank = knn_bank_rows(eval_set, 40, seed=0)
        with build_loader(eval_dir, LoaderSettings(split="train", rows=bank, **kw)) as loader:
            train = [(backbone(b.views[0]), b.labels) for b in loader]
        with build_loader(eval_dir, LoaderSettings(split="val", **kw)) as loader:
            val = [(backbone(b.views[0]), b.labels) for b in loader]
    train_f, train_y = (torch.cat(x) for x in zip(*train))
    val_f, val_y = (torch.cat(x) for x in zip(*val))
    scores = knn_scores(train_f, train_y, val_f, len(eval_set.classes), False, k=20)
    assert scores.shape[0] == len(eval_set.indices("val"))
    return {**knn_metrics(scores, val_y, False), "classes": scores.shape[1]}


def test_the_unlabeled_fixture_is_task_none(unlabeled):
    data = PackedDataset(unlabeled)
    assert data.task == "none" and data.classes == [] and (data.labels() == LABEL_NONE).all()


def test_unlabeled_pretraining_runs_with_health_figures_and_says_probe_and_knn_are_off(unlabeled, tmp_path, capsys):
    out = tmp_path / "run"
    result = pretrain(capsys, "--data", unlabeled, "--out", out, "--epochs", "1", "--log-every", "1", *TINY)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert NO_LABELS in lines and lines.index(NO_LABELS) < next(k for k, x in enumerate(lines) if "epoch 1/1" in x)
    found = rows(out)
    assert found and not any(k.startswith(("probe", "knn")) for r in found for k in r), found
    end = [r for r in found if r.get("epoch_end")][-1]
    assert 1 <= end["rankme"] <= 24 and 0 < end["emb_std"] < 1 and "corr_diag" in end  # no labels needed
    assert "eval_data" not in end
    assert NO_LABELS in (out / "train.log").read_text()
    assert (out / "backbone.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["eval_data"] is None and config["eval_data_digest"] is None


def test_eval_data_gives_knn_and_probe_figures_from_its_classes(unlabeled, covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", unlabeled, "--out", out, "--epochs", "1", "--log-every", "1", "--eval-data", covid_packed]
    result = pretrain(capsys, *argv, *TINY)
    assert result.returncode == 0, result.stderr
    eval_set = PackedDataset(covid_packed)
    assert NO_LABELS not in result.stdout
    assert f"probe and kNN on --eval-data {covid_packed} ({len(eval_set.classes)} classes" in result.stdout
    found = rows(out)
    steps = [r for r in found if not r.get("epoch_end")]
    assert steps and all(0 <= r["probe_acc"] <= 1 and r["probe_loss"] > 0 for r in steps)
    end = [r for r in found if r.get("epoch_end")][-1]
    assert end["eval_data"] == str(covid_packed) and end["eval_data_digest"] == eval_set.digest
    assert 0 <= end["knn_acc"] <= 1 and "rankme" in end
    # The same figures again from the exported backbone: the eval set's train rows as the bank, its val split as the
    # queries, its classes as the votes.
    again = knn_of_backbone(out, covid_packed)
    assert again["classes"] == len(eval_set.classes) >= 3
    assert end["knn_acc"] == pytest.approx(again["knn_acc"]), (end, again)
    assert end["knn_balanced_acc"] == pytest.approx(again["knn_balanced_acc"])
    config = json.loads((out / "config.json").read_text())
    assert config["eval_data"] == str(covid_packed) and config["eval_data_digest"] == eval_set.digest
    assert config["parts"][-1]["eval_data_digest"] == eval_set.digest


def test_the_knn_scores_the_eval_sets_val_split_against_its_train_split(unlabeled, tmp_path, capsys):
    # An eval set whose val images are copies of its train images, labels and all: the kNN (k=1) finds each one's
    # twin in the bank, so it scores 1.0 whatever the backbone has learned. Scored on anything else, it would not.
    rng = np.random.default_rng(3)
    eval_dir = tmp_path / "twins"
    writer = PackWriter(eval_dir, "t", "multiclass", ["x", "y", "z"], encoding="png", size=32, shard_samples=64)
    images = [rng.integers(0, 256, (40, 40), dtype=np.uint8) for _ in range(12)]
    for split, chosen in (("train", range(12)), ("val", range(0, 12, 2))):
        for k in chosen:
            writer.add(split, encode_image(images[k], "png"), 40, 40, {"label": k % 3})
    writer.finish({"skipped": []})
    out = tmp_path / "run"
    argv = ["--data", unlabeled, "--out", out, "--epochs", "1", "--eval-data", eval_dir, "--knn-k", "1", *TINY]
    assert pretrain(capsys, *argv).returncode == 0
    end = [r for r in rows(out) if r.get("epoch_end")][-1]
    assert end["knn_acc"] == 1.0 and end["knn_balanced_acc"] == 1.0


def test_a_multilabel_eval_set_gives_the_knn_auroc(unlabeled, tmp_path, capsys):
    rng = np.random.default_rng(4)
    eval_dir = tmp_path / "ml"
    writer = PackWriter(eval_dir, "ml", "multilabel", ["x", "y"], encoding="png", size=32, shard_samples=64)
    for split, n in (("train", 16), ("val", 8)):
        for k in range(n):
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
            labels = {"x": k % 2, "y": [None, 0, 1, -1][k % 4]}  # blanks and uncertain ones, masked out
            writer.add(split, encode_image(image, "png"), 40, 40, {"labels": labels})
    writer.finish({"skipped": []})
    out = tmp_path / "run"
    argv = ["--data", unlabeled, "--out", out, "--epochs", "1", "--log-every", "1", "--eval-data", eval_dir, *TINY]
    result = pretrain(capsys, *argv)
    assert result.returncode == 0, result.stderr
    assert "(2 labels: x, y;" in result.stdout
    found = rows(out)
    end = [r for r in found if r.get("epoch_end")][-1]
    assert 0 <= end["knn_auroc"] <= 1 and "knn_acc" not in end
    assert all(0 <= r["probe_acc"] <= 1 for r in found if not r.get("epoch_end"))


@pytest.mark.parametrize("case", ["channels", "no-val", "unlabeled", "small", "not-a-dataset"])
def test_a_bad_eval_set_is_one_line_and_writes_nothing(case, unlabeled, tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    if case == "channels":  # a 3-channel pack (the format's `channels` field), against grey training data
        make_labelled(eval_dir)
        manifest = json.loads((eval_dir / "manifest.json").read_text())
        manifest["image"]["channels"] = 3
        (eval_dir / "manifest.json").write_text(json.dumps(manifest))
        needles = ["--eval-data", "3-channel", "1-channel", "must match"]
    elif case == "no-val":
        make_labelled(eval_dir, splits=(("train", 16), ("test", 4)))
        needles = ["--eval-data", "has no val split"]
    elif case == "unlabeled":
        make_unlabeled(eval_dir, n_val=4)
        needles = ["--eval-data", "unlabeled (task none)"]
    elif case == "small":  # stored at 16 px, below --size 32 and --data's 32
        make_labelled(eval_dir, size=16)
        needles = ["--eval-data", "16 px", "--size 32"]
    else:  # a folder of images, not packed: said as --eval-data's value, not as --data's
        eval_dir.mkdir()
        (eval_dir / "a.png").write_bytes(b"")
        needles = [f"--eval-data {eval_dir}: {eval_dir}: not a packed dataset"]
    out = tmp_path / "run"
    result = pretrain(capsys, "--data", unlabeled, "--out", out, "--epochs", "1", "--eval-data", eval_dir, *TINY)
    assert str(eval_dir) in one_line(result, *needles)
    assert not out.exists()


def test_eval_data_is_compared_by_content_on_resume(unlabeled, covid_packed, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--data", unlabeled, "--out", out, "--epochs", "2", *TINY]
    assert pretrain(capsys, *base, "--max-steps", "1", "--eval-data", covid_packed).returncode == 0
    other = make_labelled(tmp_path / "other", classes=("p", "q"))
    line = one_line(pretrain(capsys, *base, "--eval-data", other), "eval_data", "--allow-change eval_data")
    assert "manifest sha256" in line
    # Allowed, it goes on with a fresh probe for the other set's 2 classes (the saved one has more outputs).
    result = pretrain(capsys, *base, "--eval-data", other, "--allow-change", "eval_data", "--max-steps", "2")
    assert result.returncode == 0, result.stderr
    parts = json.loads((out / "config.json").read_text())["parts"]
    assert [p["eval_data_digest"] for p in parts] == [PackedDataset(d).digest for d in (covid_packed, other)]


@pytest.mark.slow
def test_a_scan_pretrains_on_one_dataset_and_fine_tunes_on_another(unlabeled, covid_packed, tmp_path):
    from twinray.train import scan

    spec = {
        "data": str(covid_packed),
        "out": str(tmp_path / "scan"),
        "pretrain": {
            "data": str(unlabeled),
            "eval_data": str(covid_packed),
            "epochs": 1,
            "size": 32,
            "batch_size": 8,
            "projector": "16",
            "workers": 1,
            "compile": False,
        },  # fmt: skip
        "finetune": {"epochs": 1, "size": 32, "batch_size": 8},
        "grid": {"fraction": [1.0]},
        "then": ["linear"],
    }
    path = tmp_path / "scan.yaml"
    path.write_text(yaml.safe_dump(spec))
    pre, tune = scan.plan(scan.load_config(path))
    assert pre["kind"] == "pretrain" and pre["config"].data == str(unlabeled)
    assert pre["config"].eval_data == str(covid_packed)
    assert tune["kind"] == "finetune" and tune["config"].data == str(covid_packed)
    assert tune["config"].init == str(pre["dir"])
    assert scan.main([str(path)]) == 0
    config = json.loads((pre["dir"] / "config.json").read_text())
    assert config["data_digest"] == PackedDataset(unlabeled).digest
    assert config["eval_data_digest"] == PackedDataset(covid_packed).digest
    results = json.loads((tune["dir"] / "results.json").read_text())
    assert results["config"]["data"] == str(covid_packed) and results["config"]["init"] == str(pre["dir"])
    assert "accuracy" in results["test"]


def test_the_study_pretrains_on_its_own_data_and_watches_the_pack(tmp_path):
    from twinray.train.study_real import scan_configs

    cfg = {"work": str(tmp_path), "profile": "quick", "seeds": [0], "fractions": [1.0], "modes": ["linear"],
           "pretrain": {"data": "data/packed/chexpert", "epochs": 1}, "finetune": {}}  # fmt: skip
    barlow = scan_configs(cfg, tmp_path / "packed")["barlow"]
    assert barlow["data"] == str(tmp_path / "packed")
    assert barlow["pretrain"] == {"data": "data/packed/chexpert", "epochs": 1, "eval_data": str(tmp_path / "packed")}
    assert "eval_data" not in scan_configs({**cfg, "pretrain": {}}, tmp_path / "packed")["barlow"]["pretrain"]


def test_the_random_init_arm_builds_the_network_the_pretraining_trains(tmp_path):
    from twinray.train.study_real import scan_configs

    cfg = {"work": str(tmp_path), "profile": "cpu", "seeds": [0], "fractions": [0.1], "modes": ["linear"],
           "pretrain": {"epochs": 4, "output_stride": 16, "channels": 3, "lr": 0.001},
           "finetune": {"epochs": 15, "output_stride": 32}}  # fmt: skip
    scans = scan_configs(cfg, tmp_path / "packed")
    assert scans["random"]["finetune"] == {"epochs": 15, "output_stride": 16, "channels": 3}  # not lr, not 32
    assert scans["barlow"]["finetune"] == {"epochs": 15, "output_stride": 32}  # a run brings its own
    assert scans["random"]["finetune"] is not cfg["finetune"] and cfg["finetune"]["output_stride"] == 32


def _probe(rank: int) -> dict:
    """Three probe updates on this rank's half of a fixed batch: the probe's state and figures."""
    torch.manual_seed(0)
    probe = LinearProbe(6, 3, multilabel=False)
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(3, 8, 6, generator=g), torch.randint(0, 3, (3, 8), generator=g)
    rows = slice(rank * 4, rank * 4 + 4)
    figures = [probe.step(f[rows] + rank, y[rows]) for f, y in zip(features, labels)]  # the ranks' data differ
    return {"state": probe.state_dict(), "figures": figures}


@pytest.mark.slow
def test_the_probe_is_one_probe_over_several_processes(gloo):
    ranks = gloo(_probe, world=2, timeout_s=90)
    for name, tensor in ranks[0]["state"].items():  # the same weights and BatchNorm statistics on both ranks
        torch.testing.assert_close(ranks[1]["state"][name], tensor, rtol=0, atol=0)
    for a, b in zip(ranks[0]["figures"], ranks[1]["figures"]):
        assert a["probe_loss"].item() == b["probe_loss"].item() and a["probe_acc"].item() == b["probe_acc"].item()
    alone = _probe(0)  # rank 0's half by itself, in this process (no group): another probe
    assert not torch.equal(alone["state"]["head.1.weight"], ranks[0]["state"]["head.1.weight"])


@pytest.mark.slow
def test_two_processes_give_the_knn_of_the_exported_backbone(unlabeled, covid_packed, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", unlabeled, "--out", out, "--epochs", "1", "--eval-data", covid_packed, *TINY]
    result = run_torchrun("train/pretrain.py", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    end = [r for r in rows(out) if r.get("epoch_end")][-1]
    again = knn_of_backbone(out, covid_packed)
    assert end["knn_acc"] == pytest.approx(again["knn_acc"]) and 0 <= end["probe_acc"] <= 1
