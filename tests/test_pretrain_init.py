"""pretrain --init (issue 22 s3): the backbone starts from given weights (a run, a backbone file, a timm checkpoint
with an RGB stem), the projector fresh; recorded in config.json, compared by weights on resume; bad --init is one
line. A tiny packed set (tests/test_rerun_pretrain.py's) keeps each run to a fraction of a second a step."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import hub_offline
from tests.test_rerun_pretrain import args, make_data, pretrain, refused, tree
from twinray.train.config import PretrainConfig
from twinray.train.state import build_run
from twinray.train.transfer import backbone_weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("init") / "two", 2)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished 1-epoch run whose backbone.safetensors the others start from."""
    from twinray.train.pretrain import main

    out = tmp_path_factory.mktemp("first") / "run"
    assert main([str(a) for a in args(data, out, epochs=1, seed=3)]) == 0
    return out


def test_the_backbone_starts_from_the_file_and_the_projector_from_the_seed(finished, data):
    weights = load_file(finished / "backbone.safetensors")
    cfg = PretrainConfig(
        data=str(data), projector="16-16", predictor="8-16", size=32, batch_size=4, init=str(finished), method="byol"
    )
    state, info = backbone_weights(cfg.init, cfg.backbone, cfg.channels)
    torch.manual_seed(0)
    run = build_run(cfg, torch.device("cpu"), 4, 2, False, backbone=state)
    torch.manual_seed(0)
    fresh = build_run(cfg, torch.device("cpu"), 4, 2, False)
    got = run.model.backbone.state_dict()
    assert set(got) == set(weights)
    for key, value in weights.items():
        assert torch.equal(got[key], value), key
    # BYOL's target network starts as the same weights; the projector is the one the seed draws without --init
    target = run.model.target.module.state_dict()
    assert all(torch.equal(target[f"backbone.{k}"], v) for k, v in weights.items())
    for key, value in fresh.model.projector.state_dict().items():
        assert torch.equal(run.model.projector.state_dict()[key], value), key
    assert info["init"] == str(finished / "backbone.safetensors") and len(info["sha256"]) == 64


def test_the_first_step_sees_the_files_features(finished, data, tmp_path, capsys):
    """With an lr of 1e-20 an epoch's updates vanish beside the weights: the exported backbone is the file's,
    within 1e-15, but for BatchNorm's running statistics, which the training forwards move."""
    out = tmp_path / "cont"
    result = pretrain(capsys, *args(data, out, epochs=1, lr=1e-20, init=finished))
    assert result.returncode == 0, result.stderr
    assert "backbone from --init " in result.stdout
    start, end = load_file(finished / "backbone.safetensors"), load_file(out / "backbone.safetensors")
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for key in start:
        if not key.endswith(statistics):
            torch.testing.assert_close(end[key], start[key], rtol=1e-6, atol=1e-15, msg=key)
    assert any(not torch.equal(start[k], end[k]) for k in start if k.endswith("running_mean"))  # it did train
    config = json.loads((out / "config.json").read_text())
    backbone = json.loads((out / "backbone.json").read_text())
    digest = backbone_weights(str(finished), "resnet18", 1)[1]["sha256"]
    assert config["init"] == str(finished) and config["init_digest"] == digest
    assert backbone["parts"][0]["init"] == str(finished) and backbone["parts"][0]["init_digest"] == digest


def test_a_timm_checkpoint_with_an_rgb_stem_is_summed_into_one_channel(data, tmp_path):
    torch.manual_seed(1)
    rgb = timm.create_model("resnet18", num_classes=7, in_chans=3)  # a classifier, as timm's Hub files hold one
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, path)
    state, info = backbone_weights(str(path), "resnet18", 1)
    assert "fc.weight" not in state and state["conv1.weight"].shape == (64, 1, 7, 7)
    torch.testing.assert_close(state["conv1.weight"], rgb.conv1.weight.detach().sum(1, keepdim=True))
    assert torch.equal(state["layer4.1.bn2.weight"], rgb.layer4[1].bn2.weight.detach())
    assert info["in_chans"] == 1


def test_a_resume_with_other_init_weights_is_refused(finished, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(capsys, *args(data, out, epochs=2, max_steps=2)).returncode == 0  # random weights, stopped
    before = tree(out)
    result = pretrain(capsys, *args(data, out, epochs=2, init=finished))
    digest = backbone_weights(str(finished), "resnet18", 1)[1]["sha256"]
    refused(
        result,
        out,
        before,
        f"{out} holds a run with other settings: init none, now {digest[:16]} (weights sha256); resume with the "
        "same settings, --force to start over, or use another --out",
    )


@pytest.mark.parametrize(
    "init, needle",
    [
        ("no/such/backbone.safetensors", "--init no/such/backbone.safetensors: no such file or directory"),
        ("{run}/config.json", "not a run directory or a .safetensors backbone"),
    ],
)
def test_a_bad_init_is_one_line_and_writes_nothing(finished, data, tmp_path, capsys, init, needle):
    out = tmp_path / "run"
    result = pretrain(capsys, *args(data, out, init=init.format(run=finished)))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert needle in result.stderr and not out.exists()


def test_weights_of_another_channel_count_are_one_line(finished, data, tmp_path, capsys):
    out = tmp_path / "run"
    result = pretrain(capsys, *args(data, out, init=finished, channels=3))
    assert result.returncode == 2, result.stderr
    assert "a resnet18 backbone with 1 channel(s), and this run trains a resnet18 with 3" in result.stderr
    assert not out.exists()


def test_imagenet_without_the_cache_says_where_to_put_the_weights(data, tmp_path, capsys, monkeypatch):
    hub_offline(monkeypatch, tmp_path / "empty-cache")  # nothing is downloaded in tests
    out = tmp_path / "run"
    result = pretrain(capsys, *args(data, out, init="imagenet"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--init imagenet: timm's resnet18 weights (timm/resnet18.a1_in1k on the Hugging Face Hub)" in result.stderr
    assert f"local cache {tmp_path / 'empty-cache'} (HF_HUB_OFFLINE is set)" in result.stderr
    assert "https://huggingface.co/timm/resnet18.a1_in1k and pass --init PATH/model.safetensors" in result.stderr
    assert not out.exists()
