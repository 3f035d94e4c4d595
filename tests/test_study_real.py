"""The real-data study: its CSV (patient-level split, the issue's counts), the shortcut check, and
configs/study-real.yaml shrunk and run end to end (train/study_real.py)."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import REPO, twinray_here
from tests.layouts import KERMANY_CXR, REAL_CXR, read_grey
from twinray.prep import real_cxr
from twinray.prep.datasets import folder
from twinray.prep.format import PackedDataset, PackWriter, encode_image
from twinray.train import shortcuts
from twinray.train.metrics import multiclass_metrics
from twinray.train.study_real import main as study_main
from twinray.train.study_real import rest_recall, summarise


def test_real_csv_has_the_studys_classes_and_keeps_every_patient_in_one_split(tmp_path):
    rows = real_cxr.build_rows(REAL_CXR)
    images = Counter(r["label"] for r in rows)
    patients = {label: {r["patient"] for r in rows if r["label"] == label} for label in images}
    assert images == {"No_findings": 150, "Pneumonia": 150, "COVID-19": 243}
    assert {k: len(v) for k, v in patients.items()} == {"No_findings": 150, "Pneumonia": 150, "COVID-19": 71}
    nih = [r for r in rows if r["source"] == "nih-cxr14"]
    assert len({r["patient"] for r in nih}) == len(nih) == 300  # one image per NIH patient
    assert {r["source"] for r in rows if r["label"] == "COVID-19"} == {"mhh-covid19"}  # one hospital: a shortcut risk
    assert all((REAL_CXR / r["path"]).is_file() for r in rows)

    out = real_cxr.write_csv(rows, tmp_path / "labels.csv")
    assert real_cxr.main(["--src", str(REAL_CXR), "--out", str(tmp_path / "again.csv")]) == 0
    assert (tmp_path / "again.csv").read_bytes() == out.read_bytes()  # generated, and the same every time

    plan = folder.plan(REAL_CXR, csv_file=out, patient_col="patient", split="70/15/15")
    split_of = defaultdict(set)
    for record in plan.records:
        split_of[record.meta["patient"]].add(record.split)
    assert len(split_of) == 371 and all(len(s) == 1 for s in split_of.values())  # no patient in two splits
    per = Counter((r.meta["class"], r.split) for r in plan.records)
    for label in images:
        assert all(per[(label, s)] > 0 for s in ("train", "val", "test")), per
    assert per[("No_findings", "test")] == per[("Pneumonia", "test")] == 22  # 15% of 150 patients, rounded

    # The two RGBA images among the NIH files become ordinary grey images.
    rgba = [r for r in nih if r["path"].endswith(("00000773_001.png", "00004808_003.png"))]
    assert len(rgba) == 2
    for row in rgba:
        grey = read_grey(REAL_CXR / row["path"])
        assert grey.shape == (1024, 1024) and grey.dtype == np.uint8 and 40 < grey.mean() < 215


def test_patients_per_class_keeps_whole_patients(tmp_path):
    rows = real_cxr.build_rows(REAL_CXR, patients_per_class=3)
    by_label = defaultdict(set)
    for r in rows:
        by_label[r["label"]].add(r["patient"])
    assert {k: len(v) for k, v in by_label.items()} == {"No_findings": 3, "Pneumonia": 3, "COVID-19": 3}
    every = real_cxr.build_rows(REAL_CXR)
    kept = set().union(*by_label.values())
    assert len(rows) == sum(r["patient"] in kept for r in every)  # all of a kept patient's images


def test_fast_scores_equal_torchmetrics():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(60, 3, generator=gen).round(decimals=1)  # rounding makes ties, which AUROC must handle
    y = torch.arange(60) % 3
    probs = logits.softmax(1)
    ours = shortcuts.fast_scores(probs.numpy(), y.numpy(), source=2)
    ref = multiclass_metrics(logits, y, ["a", "b", "c"])
    assert ours["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-6)
    assert ours["auroc"] == pytest.approx(ref["auroc"], abs=1e-5)
    assert ours["source_class_auroc"] == pytest.approx(ref["per_class"]["c"]["auroc"], abs=1e-5)
    rest = (ref["per_class"]["a"]["recall"] + ref["per_class"]["b"]["recall"]) / 2
    assert ours["rest_balanced_accuracy"] == pytest.approx(rest, abs=1e-6)
    counts = ref["confusion"]["counts"]  # the study's own reading of the same, from confusion counts
    assert rest_recall(ref["confusion"], "c") == pytest.approx(rest, abs=1e-6)
    assert rest_recall({"classes": ["a", "b", "c"], "counts": [[3, 0, 1], [1, 1, 2], counts[2]]}, "c") == 0.5


def test_shortcut_check_finds_a_planted_source_mark(tmp_path):
    """Class "marked" has a bright frame (a hospital's collimation, say); content is noise for both classes."""
    rng = np.random.default_rng(0)
    writer = PackWriter(tmp_path, "planted", "multiclass", ["marked", "plain"], "png", 64, shard_samples=64)
    for k in range(96):
        label = k % 2
        image = rng.integers(60, 190, (48, 48)).astype(np.uint8)
        if label == 0:
            image[:3, :] = image[-3:, :] = image[:, :3] = image[:, -3:] = 250
        split = ("train", "train", "train", "train", "val", "test")[(k // 2) % 6]  # both classes in each split
        writer.add(split, encode_image(image, "png"), 48, 48, {"label": label, "patient": f"p{k // 2}"})
    writer.finish({"skipped": []})
    report = shortcuts.check(tmp_path, size=32, source_class="marked", resamples=100)
    border = report["probes"]["border"]["test"]
    assert border["balanced_accuracy"] == 1.0 and border["source_class_auroc"] == 1.0
    assert report["probes"]["geometry"]["test"]["balanced_accuracy"] == 0.5  # all 48 x 48: nothing to learn
    assert report["n"] == {"train": 64, "val": 16, "test": 16} and report["test_patients"] == 8


def test_summary_gives_mean_and_t_interval_per_cell():
    rows = [{"init": init, "mode": "linear", "fraction": 0.1, "seed": s, "train_images": 37,
             "balanced_accuracy": value} for init, values in (("random", (0.4, 0.5, 0.6)), ("barlow", (0.7,) * 3))
            for s, value in enumerate(values)]  # fmt: skip
    summary = summarise(rows)
    assert [s["init"] for s in summary] == ["barlow", "random"]  # Barlow first in each cell
    random = summary[1]
    assert random["seeds"] == 3 and random["balanced_accuracy_mean"] == pytest.approx(0.5)
    assert random["balanced_accuracy_ci95"] == pytest.approx(4.303 * 0.1 / 3**0.5, abs=1e-3)  # t(0.975, 2) = 4.303
    assert summary[0]["balanced_accuracy_ci95"] == 0.0


@pytest.mark.slow
def test_shrunk_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    """configs/study-real.yaml with 6 patients per class, 1 epoch at 32 px, 1 seed, one label fraction and the full
    fine-tune only (each run is a process whose imports dominate: 3 of them keep this test short)."""
    cfg = yaml.safe_load((REPO / "configs" / "study-real.yaml").read_text())
    tiny = {"epochs": 1, "size": 32, "batch_size": 8, "workers": 1}
    cfg.update(work=str(tmp_path / "work"), results=str(tmp_path / "results"), patients_per_class=6)
    cfg["profiles"]["tiny"] = {"seeds": [0], "fractions": [1.0], "modes": ["full"], "pretrain": tiny, "finetune": tiny}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [str(config), "--raw", str(REAL_CXR), "--profile", "tiny"]
    assert study_main(argv) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    out = tmp_path / "results" / "tiny"

    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["init"], s["mode"], s["fraction"]) for s in summary] == [
        ("barlow", "full", "1.0"),
        ("random", "full", "1.0"),
    ]
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert len(runs) == 2 and {r["seed"] for r in runs} == {"0"}
    packed = next((tmp_path / "work").glob("packed-*"))
    train = len(PackedDataset(packed).indices("train"))
    assert train == 20  # 6 patients per class, 70/15/15 by patient: 4 + 4 NIH images and 4 patients' 12 COVID-19
    for s in summary:
        assert s["seeds"] == "1" and float(s["train_images"]) == train and float(s["balanced_accuracy_ci95"]) == 0
        run = next(r for r in runs if r["init"] == s["init"])
        test = json.loads((REPO / run["dir"] / "results.json").read_text())["test"]
        assert float(s["balanced_accuracy_mean"]) == pytest.approx(test["balanced_accuracy"], abs=1e-4)
        assert float(s["rest_balanced_accuracy_mean"]) == pytest.approx(rest_recall(test["confusion"], "COVID-19"))

    table = (out / "table.md").read_text()
    assert table.count("| barlow | full | 1 | 20 |") == 1 and table.count("| random | full | 1 | 20 |") == 1
    for name in ("statistics", "border", "geometry", "all"):
        assert f"| {name} |" in table
    report = json.loads((out / "shortcuts.json").read_text())
    assert report["size"] == 32 and report["classes"] == ["COVID-19", "No_findings", "Pneumonia"]
    assert report["n"]["train"] == train
    assert (out / "study.png").stat().st_size > 5000

    configs = out / "configs"
    pretrain = json.loads((configs / "pretrain-seed-0.json").read_text())
    assert pretrain["epochs"] == 1 and pretrain["size"] == 32 and pretrain["seed"] == 0
    tunes = [json.loads(line) for line in (configs / "finetunes.jsonl").read_text().splitlines()]
    assert sorted(t["init"] for t in tunes) == sorted(["random", pretrain["out"]]) and {t["size"] for t in tunes} == {
        32
    }
    assert yaml.safe_load((configs / "study.yaml").read_text())["profile"] == "tiny"
    first = json.loads((out / "timings.json").read_text())["invocations"]
    assert len(first) == 1 and set(first[0]["steps"]) == {"csv", "prep", "scan-barlow", "scan-random", "shortcuts"}

    assert study_main(argv) == 0  # every run is finished: nothing is trained again
    printed = capsys.readouterr().out
    assert "scan: 2 runs, 2 already finished" in printed and "scan: 1 runs, 1 already finished" in printed
    assert len(list(csv.DictReader(open(out / "runs.csv")))) == 2
    assert len(json.loads((out / "timings.json").read_text())["invocations"]) == 2  # the first one's figures kept


def test_a_missing_data_folder_is_one_line(tmp_path, capsys):
    config = REPO / "configs" / "study-real.yaml"
    result = twinray_here(capsys, "study-real", config, "--raw", tmp_path / "nowhere", "--profile", "cpu")
    assert result.returncode == 2 and "nowhere: no such folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_shrunk_one_hospital_study_reports_the_thumbnail_floor_per_fraction(tmp_path, capsys):
    """configs/study-kermany.yaml with 6 patients per class, 1 epoch at 32 px, 1 seed, linear probes at two
    fractions: the dataset's own labels.csv, no source class, and the thumbnail floor fitted on exactly the images
    each fraction's probes trained on."""
    cfg = yaml.safe_load((REPO / "configs" / "study-kermany.yaml").read_text())
    tiny = {"epochs": 1, "size": 32, "batch_size": 8, "workers": 1}
    cfg.update(work=str(tmp_path / "work"), results=str(tmp_path / "results"), patients_per_class=6)
    cfg["profiles"]["tiny"] = {"seeds": [0], "fractions": [0.5, 1.0], "modes": ["linear"], "prep": {"size": 48},
                               "pretrain": {**tiny, "eval_every": 1}, "finetune": tiny}  # fmt: skip
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [str(config), "--raw", str(KERMANY_CXR), "--profile", "tiny"]
    assert study_main(argv) == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "results" / "tiny"

    labels = list(csv.DictReader(open(tmp_path / "work" / "labels.csv")))
    every = list(csv.DictReader(open(KERMANY_CXR / "labels.csv")))
    kept = {r["patient"] for r in labels}
    per_class = {k: len({r["patient"] for r in labels if r["label"] == k}) for k in ("NORMAL", "BACTERIA", "VIRUS")}
    assert min(per_class.values()) >= 6  # 6 kept per class; one child's images can hold both pneumonia kinds
    assert len(labels) == sum(r["patient"] in kept for r in every)  # whole patients, the CSV's own columns
    packed = PackedDataset(next((tmp_path / "work").glob("packed-*")))
    assert packed.manifest["dataset"] == "kermany-cxr" and packed.classes == ["BACTERIA", "NORMAL", "VIRUS"]
    assert max(packed.index["height"]) == 48  # the profile's own prep size

    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert [(s["init"], s["mode"], s["fraction"]) for s in summary] == [
        ("barlow", "linear", "0.5"), ("random", "linear", "0.5"), ("thumbnail", "linear", "0.5"),
        ("barlow", "linear", "1.0"), ("random", "linear", "1.0"), ("thumbnail", "linear", "1.0"),
    ]  # fmt: skip
    runs = list(csv.DictReader(open(out / "runs.csv")))
    for fraction in ("0.5", "1.0"):
        cell = {r["init"]: r for r in runs if r["fraction"] == fraction}
        assert cell["thumbnail"]["dir"] == "" and cell["thumbnail"]["train_images"] == cell["barlow"]["train_images"]
    half = {r["init"]: int(r["train_images"]) for r in runs if r["fraction"] == "0.5"}
    assert half["thumbnail"] < len(packed.indices("train"))
    again = shortcuts.fraction_floor(packed.root, 32, [0.5, 1.0], [0])  # the floor read back through the same code
    floor = [r for r in runs if r["init"] == "thumbnail"]
    assert [float(r["balanced_accuracy"]) for r in floor] == pytest.approx([r["balanced_accuracy"] for r in again])
    assert [int(r["train_images"]) for r in floor] == [r["train_images"] for r in again]

    table = (out / "table.md").read_text()
    assert "| thumbnail | linear | 0.5 |" in table and "None AUROC" not in table and "COVID" not in table
    assert "the trivial floor" in table
    report = json.loads((out / "shortcuts.json").read_text())
    assert report["source_class"] is None and "thumbnail" not in report["probes"]  # the floor is no source probe
    assert set(json.loads((out / "timings.json").read_text())["invocations"][0]["steps"]) == {
        "csv", "prep", "scan-barlow", "scan-random", "shortcuts", "floor"}  # fmt: skip
    assert (out / "study.png").stat().st_size > 5000


def test_the_thumbnail_is_the_cell_means_and_the_views_mean_and_std():
    views = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    features = shortcuts.thumbnail(views)
    assert features.shape == (3, 66) and features.dtype == torch.float64
    cells = views.double().reshape(3, 8, 2, 8, 2).mean((2, 4)).reshape(3, 64)
    assert torch.allclose(features[:, :64], cells)
    assert torch.allclose(features[:, 64], views.double().flatten(1).mean(1))
    assert torch.allclose(features[:, 65], views.double().flatten(1).std(1))
