"""`twinray export` (train/export.py) and the recorded preprocessing (train/preprocessing.py), on a real finished
pretraining run and a real fine-tuning run of it (issue 22, section 1; docs/reuse.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from safetensors.torch import load_file

from twinray import command
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep.format import PackedDataset
from twinray.train import preprocessing, transfer
from twinray.train.export import ONNX_TOLERANCE
from twinray.train.export import main as export_main
from twinray.train.model import Classifier

TINY = ["--size", "32", "--batch-size", "16", "--projector", "64", "--wandb", "disabled", "--workers", "1"]


def finished_run(out: Path, data: Path, *extra: str) -> Path:
    """A real pretraining run of one epoch at 32 px (a few seconds on a CPU), finished: backbone.safetensors."""
    from twinray.train.pretrain import main

    assert main(["--data", str(data), "--out", str(out), "--epochs", "1", *TINY, *extra]) == 0
    assert (out / "backbone.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def run(covid_packed, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("export") / "run", covid_packed)


@pytest.fixture(scope="module")
def finetuned(run, covid_packed, tmp_path_factory) -> Path:
    from twinray.train.finetune import main

    out = tmp_path_factory.mktemp("export-ft") / "ft"
    argv = ["--data", str(covid_packed), "--init", str(run), "--out", str(out), "--epochs", "1", "--size", "32",
            "--batch-size", "16", "--workers", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    return out


def images(data: Path, n: int = 5) -> torch.Tensor:
    """The first n val+test images as the tools feed them: EVAL_RECIPE at 32 px, float32 N x 1 x 32 x 32."""
    with build_loader(
        str(data), LoaderSettings(split="test", batch_size=n, recipe=EVAL_RECIPE, size=32, views=1, drop_last=False)
    ) as ld:
        return next(iter(ld)).views[0].contiguous()


def backbone_of(run: Path) -> torch.nn.Module:
    info = json.loads((run / "backbone.json").read_text())
    model = timm.create_model(info["timm_name"], num_classes=0, in_chans=info["in_chans"])
    model.load_state_dict(load_file(run / "backbone.safetensors"))
    return model.eval()


def test_backbone_json_records_the_preprocessing(run, covid_packed):
    prep = json.loads((run / "backbone.json").read_text())["preprocessing"]
    manifest = PackedDataset(covid_packed).manifest
    assert prep["input"]["range"] == [0.0, 1.0] and prep["input"]["shape"] == ["N", 1, 32, 32]
    assert prep["normalization"] == {"mean": [0.0], "std": [1.0]}  # EVAL_RECIPE normalises nothing
    assert prep["prep"]["size"] == manifest["prep"]["size"] == 256
    assert prep["prep"]["bit_depth"] == manifest["prep"]["bit_depth"] and prep["prep"]["encoding"] == "jpeg"
    assert "Modality LUT" in prep["prep"]["dicom"]
    assert preprocessing.differences(prep, manifest) == []
    other = {**manifest, "prep": {**manifest["prep"], "size": 512, "bit_depth": 12}}
    assert preprocessing.differences(prep, other) == ["size model 256, data 512", "bit_depth model 'full', data 12"]


def test_timm_export_loads_as_pretrained_offline_and_gives_the_runs_features(run, covid_packed, tmp_path):
    out = tmp_path / "timm"
    assert export_main([str(run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # a Hub repo
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.0] and cfg["std"] == [1.0]
    assert cfg["interpolation"] == "bicubic" and cfg["num_classes"] == 0 and cfg["crop_pct"] == 1.0
    assert config["twinray"]["preprocessing"]["prep"]["size"] == 256
    x, want = images(covid_packed), None
    with torch.no_grad():
        want = backbone_of(run)(x)
        model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own reader of the folder
        assert model.num_classes == 0 and model.pretrained_cfg["input_size"] == (1, 32, 32)
        assert torch.equal(model(x), want)
        # any timm: the architecture by name, the weights by file
        other = timm.create_model("resnet18", pretrained=True, num_classes=0, in_chans=1,
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()  # fmt: skip
        assert torch.equal(other(x), want)
    card = (out / "README.md").read_text()
    digest = PackedDataset(covid_packed).digest
    knn = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    knn_acc = [r["knn_acc"] for r in knn if "knn_acc" in r][-1]
    needles = [
        "library_name: timm",
        "covid19-radiography",
        digest,
        "method: barlow, epochs 1",
        "knn_acc",
        f"{knn_acc:.4f}",
        "range [0.0, 1.0]",
        "mean [0.0], std [1.0]",
        "`bit_depth`: full",
        "Modality LUT",
    ]
    for needle in needles:
        assert needle in card, needle


def test_onnx_export_agrees_with_pytorch_within_the_stated_tolerance(run, covid_packed, tmp_path):
    out = tmp_path / "onnx"
    assert export_main([str(run), "--format", "onnx", "--out", str(out)]) == 0
    record = json.loads((out / "model.json").read_text())
    assert record["output"]["name"] == "features" and record["input"]["shape"] == ["batch", 1, 32, 32]
    assert record["preprocessing"]["normalization"]["std"] == [1.0]
    assert record["onnxruntime_check"]["relative"] <= ONNX_TOLERANCE
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    model = backbone_of(run)
    x = images(covid_packed)
    for batch in (x, x[:1]):  # the batch axis is dynamic
        got = session.run(None, {"input": batch.numpy()})[0]
        with torch.no_grad():
            want = model(batch).numpy()
        assert got.shape == want.shape == (len(batch), 512)
        assert np.abs(got - want).max() <= ONNX_TOLERANCE * np.abs(want).max()


def test_a_finetuned_model_exports_as_timm_and_onnx_with_its_classes(finetuned, covid_packed, tmp_path):
    info = json.loads((finetuned / "model.json").read_text())
    classes = info["classes"]
    assert info["preprocessing"]["prep"]["size"] == 256 and info["preprocessing"]["input"]["shape"][-1] == 32
    backbone, init = transfer.load_backbone(str(finetuned / "model.safetensors"))
    ours = Classifier(backbone, len(classes), init["in_chans"])
    ours.load_state_dict(load_file(finetuned / "model.safetensors"))
    x = images(covid_packed)
    with torch.no_grad():
        want = ours.eval()(x)
    assert export_main([str(finetuned), "--out", str(tmp_path / "timm")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["num_classes"] == len(classes) and config["label_names"] == classes
    with torch.no_grad():
        model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        got = model(x)
    assert got.shape == (len(x), len(classes))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # the head folded into timm's fc
    assert model.pretrained_cfg["label_names"] == classes
    assert export_main([str(finetuned), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert record["output"]["name"] == "logits" and record["classes"] == classes
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(logits - want.numpy()).max() <= ONNX_TOLERANCE * np.abs(want.numpy()).max()
    assert "fine-tuned by twinray" in (tmp_path / "onnx" / "README.md").read_text()


def test_an_unfinished_run_is_one_line_exit_2(covid_packed, tmp_path, capsys):
    from twinray.train.pretrain import main

    stopped = tmp_path / "stopped"
    assert main(["--data", str(covid_packed), "--out", str(stopped), "--epochs", "1", "--max-steps", "1", *TINY]) == 0
    assert not (stopped / "backbone.safetensors").exists()
    capsys.readouterr()
    assert command.main(["export", str(stopped), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"export: error: {stopped}: the run has not finished") and err.count("\n") == 1, err
    assert "backbone.safetensors" in err and not (tmp_path / "x").exists()
    assert command.main(["export", str(tmp_path)]) == 2  # a folder with no run in it
    err = capsys.readouterr().err
    assert "not a twinray run" in err and err.count("\n") == 1


def test_an_existing_export_is_kept_without_force(run, tmp_path, capsys):
    out = tmp_path / "timm"
    assert export_main([str(run), "--out", str(out)]) == 0
    (out / "mine.txt").write_text("kept")
    assert command.main(["export", str(run), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (out / "mine.txt").is_file()
    assert export_main([str(run), "--out", str(out), "--force"]) == 0
    assert not (out / "mine.txt").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_finetune_warns_in_one_line_when_the_data_was_prepared_otherwise(run, covid_packed, tmp_path, capsys):
    from twinray.train.finetune import main

    data = tmp_path / "other"
    shutil.copytree(covid_packed, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["prep"].update(size=512, bit_depth=12)
    (data / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    argv = ["--data", str(data), "--init", str(run), "--out", str(tmp_path / "ft"), "--mode", "linear", "--epochs",
            "1", "--size", "32", "--batch-size", "16", "--workers", "1", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        f"finetune: warning: {data} was prepared otherwise than the model's data: size model 256, data 512; "
        "bit_depth model 'full', data 12"
    ]
    # the fine-tuned model records the pixels it was trained on: this data's
    assert json.loads((tmp_path / "ft" / "model.json").read_text())["preprocessing"]["prep"]["size"] == 512


def test_force_never_replaces_the_run_it_reads(run, tmp_path, capsys):
    copy = tmp_path / "runs" / "bt"
    shutil.copytree(run, copy)
    # --out RUN --force replaced the run (checkpoints, metrics) with its own export; --out runs/ all the runs
    for out in (copy, copy.parent):
        assert command.main(["export", str(copy), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert err == f"export: error: --out {out} is or holds {copy}, which this command reads; give another --out\n"
    assert (copy / "backbone.safetensors").is_file() and (copy / "metrics.jsonl").is_file()
    # an --out with no name of its own was a traceback (pathlib's with_name on '/')
    assert command.main(["export", str(copy), "--out", "/", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: --out /: give a folder of its own") and err.count("\n") == 1, err
    assert export_main([str(copy), "--out", str(tmp_path / "runs" / "bt-timm")]) == 0  # beside it: fine
