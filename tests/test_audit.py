"""`twinray audit` (train/audit.py): a planted source shortcut is found, labels independent of it score near
chance, and a dataset it cannot score is one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from twinray import command
from twinray.prep.format import PackWriter, encode_image
from twinray.train import audit, shortcuts

PATIENTS = 32  # two images each, 48 x 48 px
SPLIT = ("train",) * 6 + ("val", "test")  # by patient: p % 8


def write_pack(root, planted: bool, patients: int = PATIENTS, task: str = "multiclass", ids: bool = True):
    """Noise images with a 3 px frame, bright for one hospital and dark for the other. planted: the label is the
    hospital (class "a" all bright, from hospital A); else the same images with labels independent of it (half
    of each hospital's patients in each class). Metadata: origin (the hospital), sex and age (random), source, and
    the patient unless not `ids`."""
    rng = np.random.default_rng(0)
    classes = ["a", "b"] if task == "multiclass" else []
    writer = PackWriter(root, "planted" if planted else "plain", task, classes, "png", 64, shard_samples=64)
    for p in range(patients):
        hospital = (p // 8) % 2
        label = hospital if planted else ((p % 8) + p // 16) % 2
        sex = str(rng.choice(["F", "M"]))
        age = int(rng.integers(20, 90))
        for k in range(2):
            image = rng.integers(60, 190, (48, 48)).astype(np.uint8)
            image[:3, :] = image[-3:, :] = image[:, :3] = image[:, -3:] = 240 if hospital == 0 else 20
            meta = {"patient": f"p{p}", "origin": "AB"[hospital], "sex": sex, "age": age, "source": f"p{p}/{k}.png"}
            if not ids:
                del meta["patient"]
            if task == "multiclass":
                meta.update(label=label, **{"class": classes[label]})
            writer.add(SPLIT[p % 8], encode_image(image, "png"), 48, 48, meta)
    writer.finish({"skipped": []})
    return root


def test_audit_finds_a_planted_source_shortcut(tmp_path, capsys):
    data = write_pack(tmp_path / "planted", planted=True)
    out = tmp_path / "audit.json"
    assert command.main(["audit", str(data), "--size", "32", "--resamples", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    probes = report["probes"]
    assert list(probes) == ["statistics", "border", "geometry", "all", "age", "origin", "sex"]
    assert probes["border"]["test"]["balanced_accuracy"] > 0.9 and probes["border"]["test"]["auroc"] > 0.9
    assert probes["origin"]["test"]["balanced_accuracy"] == 1.0 and probes["origin"]["kind"] == "metadata"
    assert abs(probes["geometry"]["test"]["balanced_accuracy"] - 0.5) < 0.1  # all 48 x 48: nothing to learn
    low, high = probes["border"]["test_ci95"]["balanced_accuracy"]
    assert 0.5 < low <= probes["border"]["test"]["balanced_accuracy"] <= high
    assert len(probes["border"]["l2"]) == report["folds"] == 5
    assert report["protocol"] == "cv" and report["grouped_by"] == "patient" and report["test_patients"] == PATIENTS
    assert report["scored"]["images"] == 2 * PATIENTS and report["n"] == {"train": 48, "val": 8, "test": 8}
    assert report["metadata"]["used"] == {"age": "number", "origin": "one-hot, 2 values", "sex": "one-hot, 2 values"}
    assert set(report["metadata"]["skipped"]) == {"class", "label", "patient", "source", "split"}
    assert report["too_small"] is None  # 16 patients per class
    assert report["verdict"].startswith("a model scoring below 1.00 balanced accuracy here beats no shortcut")
    lines = printed.splitlines()
    assert "5-fold cross-validation over 64 images, grouped by patient (32 patients)" in lines[0]
    assert any(line.startswith("border") and " 30 " in line for line in lines)
    assert lines[-2] == f"verdict: {report['verdict']}" and lines[-1] == f"wrote {out}"

    # the study's protocol on the same data: fitted on train, scored on the test split's 4 patients
    held = audit.audit(data, size=32, protocol="held-out", resamples=200)
    assert held["probes"]["border"]["test"]["balanced_accuracy"] == 1.0 and held["test_patients"] == 4
    assert held["too_small"].startswith("too small to mean much: the test split has fewer than 10 patients in a 2")


def test_audit_without_a_shortcut_scores_near_chance(tmp_path, capsys):
    data = write_pack(tmp_path / "plain", planted=False)
    out = tmp_path / "audit.json"
    assert command.main(["audit", str(data), "--size", "32", "--resamples", "200", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name, probe in report["probes"].items():
        score = probe["test"]["balanced_accuracy"]
        low, high = probe["test_ci95"]["balanced_accuracy"]
        assert score < 0.75 and low <= 0.5, (name, score, low)
    assert report["verdict"].startswith("no shortcut found: no probe's interval clears chance")
    assert capsys.readouterr().out.splitlines()[-2] == f"verdict: {report['verdict']}"


def test_audit_refuses_what_it_cannot_score_in_one_line(tmp_path, capsys):
    def refused(*argv) -> str:
        out = [] if "--out" in argv else ["--out", str(tmp_path / "a.json")]
        assert command.main(["audit", *argv, *out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("audit: error: ") and err.count("\n") == 1, err
        return err

    unlabelled = write_pack(tmp_path / "none", planted=True, patients=8, task="none")
    assert "unlabelled (task 'none')" in refused(str(unlabelled))
    tiny = write_pack(tmp_path / "tiny", planted=True, patients=2)  # both patients of class a
    assert "too small to audit: 4 labelled images, classes present: a (at least 2 are needed)" in refused(str(tiny))
    one = write_pack(tmp_path / "one", planted=True, patients=9)  # b: 1 patient
    assert "too small to audit: every class needs at least 2 patients, and b (1) has fewer" in refused(str(one))
    few = write_pack(tmp_path / "few", planted=True, patients=10)  # a: 8 patients, b: 2
    assert "too small to audit: 10 patients for 12 folds (--folds)" in refused(str(few), "--folds", "12")
    assert "the val split has no image of b (try --protocol cv)" in refused(str(few), "--protocol", "held-out")
    assert "nowhere" in refused(str(tmp_path / "nowhere"))
    assert not (tmp_path / "a.json").exists()

    # small enough to score, too small to read: the one line that says so
    small = audit.audit(write_pack(tmp_path / "small", planted=True, patients=12), size=32, folds=3, resamples=100)
    assert small["too_small"] == (
        "too small to mean much: the dataset has fewer than 10 patients in a 8, b 4; "
        "the intervals are wide and a probe can look better or worse than it is"
    )
    out = tmp_path / "kept.json"
    out.write_text("{}")
    assert "kept.json exists; pass --force to replace it" in refused(str(small["data"]), "--out", str(out))
    assert out.read_text() == "{}"


def test_metadata_coding():
    metas = [{"view": "PA" if i % 3 else None, "age": None if i == 0 else i, "ids": f"x{i}", "one": 1,
              "labels": {"a": 1}, "flag": bool(i % 2)} for i in range(12)]  # fmt: skip
    features, used, skipped = shortcuts.metadata_features(metas)
    assert used == {"age": "number, missing indicator", "flag": "number", "view": "one-hot, 2 values (one is missing)"}
    assert skipped == {"ids": "12 values in 12 images: names images, not a category", "labels": "the label",
                       "one": "one value"}  # fmt: skip
    assert features["age"].shape == (12, 2) and features["age"][0, 0] == pytest.approx(np.mean(range(1, 12)))
    assert features["age"][:, 1].tolist() == [1.0] + [0.0] * 11
    assert features["view"].sum(1).tolist() == [1.0] * 12 and features["view"][0].tolist() == [1.0, 0.0]


def test_audit_without_patient_ids_groups_per_image(tmp_path):
    report = audit.audit(write_pack(tmp_path / "ids", planted=True, patients=12, ids=False), size=32, folds=3,
                         resamples=100)  # fmt: skip
    assert report["grouped_by"] == "image" and report["without_patient"] == report["test_patients"] == 24
    assert "3-fold cross-validation over 24 images, per image (the sample JSON has no patient)" in audit.table(report)
    assert report["too_small"].startswith("too small to mean much: the dataset has fewer than 10 images in b 8")


def test_out_is_checked_before_the_probes_run(tmp_path, capsys):
    data = write_pack(tmp_path / "small", planted=True, patients=12)
    folder = tmp_path / "reports"
    folder.mkdir()
    argv = ["audit", str(data), "--size", "32", "--folds", "3", "--resamples", "100"]
    # a folder as --out, even with --force, was a traceback once every probe had run (and os.replace refused it)
    assert command.main([*argv, "--out", str(folder), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"audit: error: --out {folder} is a folder") and err.count("\n") == 1, err
    assert folder.is_dir() and not list(folder.iterdir())
    (tmp_path / "afile").write_text("x")
    assert command.main([*argv, "--out", str(tmp_path / "afile" / "a.json")]) == 2
    assert "cannot make its folder" in capsys.readouterr().err
    # a missing dataset is said as that, not as "audit.json exists" when the default --out is there
    (tmp_path / "audit.json").write_text("{}")
    assert command.main(["audit", str(tmp_path / "nowhere"), "--out", str(tmp_path / "audit.json")]) == 2
    assert "nowhere: no such directory" in capsys.readouterr().err
    # an --out in a folder that does not exist yet: made, and the report written (was a traceback after the run)
    out = tmp_path / "new" / "deeper" / "audit.json"
    assert command.main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["classes"] == ["a", "b"]
