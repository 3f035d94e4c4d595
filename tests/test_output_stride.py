"""`--output-stride` (train/model.py OUTPUT_STRIDES): a backbone whose last stages dilate instead of striding, and
every tool that rebuilds it from what a run wrote: --init, finetune's model.json, export (timm and ONNX), embed and
gradcam. The same tensors load at every stride without an error, so each check compares features with a reference
built at the stride the run used, and shows that the stock stride would give other features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import twinray_here
from tests.test_export import TINY, finished_run, images
from twinray.train import gradcam, transfer
from twinray.train.embed import load_model as embed_model
from twinray.train.embed import main as embed_main
from twinray.train.export import ONNX_TOLERANCE
from twinray.train.export import main as export_main
from twinray.train.finetune import main as finetune_main
from twinray.train.model import OUTPUT_STRIDES, build_backbone


@pytest.fixture(scope="module")
def run(covid_packed, tmp_path_factory) -> Path:
    """A finished pretraining at 32 px with output stride 16: layer4 ends in a 2 x 2 map, not 1 x 1."""
    return finished_run(tmp_path_factory.mktemp("stride") / "run", covid_packed, "--output-stride", "16")


@pytest.fixture(scope="module")
def finetuned(run, covid_packed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stride-ft") / "ft"
    assert finetune_main(["--data", str(covid_packed), "--init", str(run), "--out", str(out), "--epochs", "1",
                          "--size", "32", "--batch-size", "16", "--workers", "1", "--device", "cpu"]) == 0  # fmt: skip
    return out


def reference(weights: dict, output_stride: int) -> torch.nn.Module:
    """timm's resnet18 at `output_stride`, one channel, with `weights`: what the run's features must equal."""
    extra = {} if output_stride == 32 else {"output_stride": output_stride}
    model = timm.create_model("resnet18", num_classes=0, in_chans=1, **extra)
    model.load_state_dict(weights)
    return model.eval()


def run_weights(run: Path) -> dict:
    return load_file(run / "backbone.safetensors")


def test_the_last_map_is_the_input_over_the_stride_and_the_tensors_are_the_same():
    x = torch.zeros(2, 1, 64, 64)
    shapes = {k: v.shape for k, v in build_backbone().state_dict().items()}
    for stride in OUTPUT_STRIDES:
        model = build_backbone("resnet18", 1, output_stride=stride).eval()
        assert model.forward_features(x).shape == (2, 512, 64 // stride, 64 // stride)
        assert model(x).shape == (2, 512)
        assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # dilation has no weights
    assert build_backbone("efficientnet_b0", 1, output_stride=16).eval().forward_features(x).shape[-1] == 4
    with pytest.raises(ValueError, match="output_stride must be one of 32, 16, 8, got 12"):
        build_backbone(output_stride=12)


def test_the_run_records_its_stride_and_init_rebuilds_it(run, covid_packed):
    info = json.loads((run / "backbone.json").read_text())
    assert info["output_stride"] == 16 and json.loads((run / "config.json").read_text())["output_stride"] == 16
    with safe_open(str(run / "backbone.safetensors"), "pt") as f:
        assert f.metadata()["output_stride"] == "16"
    backbone, found = transfer.load_backbone(str(run))
    assert found["output_stride"] == 16
    x = images(covid_packed)
    with torch.no_grad():
        got, want = backbone.eval()(x), reference(run_weights(run), 16)(x)
        stock = reference(run_weights(run), 32)(x)
    assert torch.equal(got, want)
    assert (got - stock).abs().max() > 1e-3  # the stock stride would have loaded without an error, and differs


def test_a_finetune_of_the_run_keeps_its_stride_through_model_json_and_gradcam(finetuned, run, covid_packed):
    info = json.loads((finetuned / "model.json").read_text())
    assert info["output_stride"] == 16 and info["init"] == str(run / "backbone.safetensors")
    model, _ = gradcam.load_model(finetuned)
    x = images(covid_packed)
    assert model.backbone.forward_features(x).shape[-1] == 2  # 32 px / 16
    backbone, found = transfer.load_backbone(str(finetuned))  # a fine-tuned model as --init: its backbone
    assert found["output_stride"] == 16 and backbone.eval().forward_features(x).shape[-1] == 2


def test_random_init_takes_the_flag_and_a_bad_value_is_one_line(covid_packed, tmp_path, capsys):
    out = tmp_path / "random"
    assert finetune_main(["--data", str(covid_packed), "--init", "random", "--output-stride", "8", "--out", str(out),
                          "--epochs", "1", "--size", "32", "--batch-size", "16", "--workers", "1",
                          "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((out / "model.json").read_text())["output_stride"] == 8
    for tool in ("pretrain", "finetune"):
        done = twinray_here(capsys, tool, "--data", covid_packed, "--out", tmp_path / tool, "--init", "random",
                            "--output-stride", "12")  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr
        line = done.stderr.strip()
        assert "\n" not in line and "output_stride" in line.replace("-", "_") and "12" in line, line
        assert not (tmp_path / tool).exists()


def test_a_rerun_with_another_stride_is_refused_and_continued_pretraining_may_change_it(run, covid_packed, tmp_path,
                                                                                        capsys):  # fmt: skip
    done = twinray_here(capsys, "pretrain", "--data", covid_packed, "--out", run, "--epochs", "1", *TINY)
    assert done.returncode == 2 and "output_stride 16, now 32" in done.stderr, done.stderr
    assert json.loads((run / "backbone.json").read_text())["output_stride"] == 16  # the finished run kept
    # --init: the same tensors at another stride are a valid start (as DeepLab starts from ImageNet's)
    other = finished_run(tmp_path / "from-16", covid_packed, "--init", str(run))
    assert json.loads((other / "backbone.json").read_text())["output_stride"] == 32


def test_export_timm_and_onnx_and_embed_give_the_runs_features(run, covid_packed, tmp_path):
    x = images(covid_packed)
    with torch.no_grad():
        want = reference(run_weights(run), 16)(x)
    assert export_main([str(run), "--out", str(tmp_path / "timm")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["model_args"] == {"in_chans": 1, "output_stride": 16}
    assert config["twinray"]["output_stride"] == 16
    assert "output_stride=16" in (tmp_path / "timm" / "README.md").read_text()
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()  # timm's own reader
        assert torch.equal(loaded(x), want)
        for model in (tmp_path / "timm", run):
            backbone, info = embed_model(model)
            assert info["output_stride"] == 16 and torch.equal(backbone(x), want)
    assert embed_main(["--model", str(run), "--data", str(covid_packed), "--out", str(tmp_path / "emb"),
                       "--device", "cpu", "--workers", "1", "--splits", "val"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "emb" / "embed.json").read_text())["output_stride"] == 16
    assert export_main([str(run), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= ONNX_TOLERANCE * np.abs(want.numpy()).max()


def test_a_finetuned_export_builds_the_classifier_at_its_stride(finetuned, covid_packed, tmp_path):
    assert export_main([str(finetuned), "--out", str(tmp_path / "timm")]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["model_args"]["output_stride"] == 16
    model, _ = gradcam.load_model(finetuned)
    x = images(covid_packed)
    with torch.no_grad():
        loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)
