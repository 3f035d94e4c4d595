"""twinray as a user installs it: a wheel built from the repository, installed into a new virtualenv that cannot see
the checkout, run from another folder, from `twinray --help` to a pretraining whose backbone loads into timm.

The new virtualenv does not re-install torch and the rest (5 GB): a `.pth` file in its site-packages holds one path
line, this environment's site-packages, which Python appends to sys.path. A path line runs nothing, so the editable
install's import hook (a `.pth` *inside* that folder) is not executed and the checkout stays off the path; the
wheel's own copy in the new site-packages comes first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import load_file  # the reader the build uses (any Python)

from tests.conftest import REPO


def build_wheel(dest: Path) -> Path:
    """The wheel of a clean copy of the repository's sources (setuptools builds in the source tree, and a stale
    build/ there could hand on files the package list no longer names)."""
    src = dest / "src"
    src.mkdir(parents=True)
    setuptools = load_file(REPO / "pyproject.toml")["tool"]["setuptools"]
    for name in ["pyproject.toml", "README.md", *setuptools["package-dir"].values()]:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dest, src], REPO)
    (wheel,) = dest.glob("twinray-*.whl")
    return wheel


def make_venv(root: Path) -> Path:
    """A virtualenv at `root` that imports this environment's packages (through a .pth path line) but not twinray
    itself; returns its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True)
    (site,) = root.glob("lib/python*/site-packages")
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "twinray-test-deps.pth").write_text("".join(f"{path}\n" for path in deps))
    return site


def run(command: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the GPU machine runs with PYTHONPATH=.
    result = subprocess.run(list(map(str, command)), cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    return result


# In the new virtualenv: where twinray comes from, that the checkout's folders are not importable, and that the
# exported backbone loads into timm (strict: every key).
CHECK = """
import importlib.util, json, sys
import timm, twinray, twinray.train.losses
from safetensors.torch import load_file
info = json.load(open("run/backbone.json"))
model = timm.create_model(info["timm_name"], pretrained=False, num_classes=0, in_chans=info["in_chans"])
missing = model.load_state_dict(load_file("run/backbone.safetensors"), strict=True)
print(json.dumps({
    "twinray": twinray.__file__, "path": twinray.__path__, "losses": twinray.train.losses.__file__,
    "checkout_prep": importlib.util.find_spec("prep") is not None, "num_features": model.num_features,
    "keys": len(model.state_dict()),
}))
"""


@pytest.mark.slow
def test_installed_wheel_runs_from_elsewhere(tmp_path):
    wheel = build_wheel(tmp_path / "dist")
    venv = tmp_path / "venv"
    site = make_venv(venv)
    run([venv / "bin/python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
         "-q", wheel], tmp_path)  # fmt: skip
    # every module of the repository's packages is in the new site-packages
    setuptools = load_file(REPO / "pyproject.toml")["tool"]["setuptools"]
    for name, folder in setuptools["package-dir"].items():
        for path in (REPO / folder).rglob("*.py"):
            installed = site.joinpath(*name.split("."), path.relative_to(REPO / folder))
            assert installed.is_file(), f"{path.relative_to(REPO)} is not in the wheel"
    assert sorted(p.name for p in (site / "twinray/configs").iterdir()) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml")
    )

    work = tmp_path / "work"
    work.mkdir()
    twinray = venv / "bin/twinray"
    assert "  pretrain  " in run([twinray, "--help"], work).stdout
    run([twinray, "prep", "sample", "--out", "raw", "--n", "24", "--workers", "1"], work)
    packed = run([twinray, "prep", "covid", "--src", "raw/COVID-19_Radiography_Dataset", "--out", "packed",
                  "--workers", "1", "--size", "48"], work)  # fmt: skip
    assert "packed 24 images" in packed.stdout and "(train 19 " in packed.stdout
    # the same files as a user's own tree of class folders (masks/ ignored, the .xlsx beside them not an input)
    folder = run([twinray, "prep", "folder", "--src", "raw/COVID-19_Radiography_Dataset", "--out", "mine",
                  "--workers", "1", "--size", "48"], work)  # fmt: skip
    assert "packed 24 images" in folder.stdout, folder.stdout
    assert json.loads((work / "mine/manifest.json").read_text())["dataset"] == "COVID-19_Radiography_Dataset"
    run([twinray, "configs", "demo-scan", "--copy", "."], work)
    assert (work / "demo-scan.yaml").read_bytes() == (REPO / "configs/demo-scan.yaml").read_bytes()
    # one step: 19 training images, batch 16, the last partial batch dropped; the epoch's end exports the backbone
    run([twinray, "pretrain", "--data", "packed", "--out", "run", "--size", "32", "--epochs", "1", "--batch-size",
         "16", "--wandb", "disabled", "--workers", "1"], work)  # fmt: skip
    steps = [json.loads(line)["step"] for line in (work / "run/metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1

    found = json.loads(run([venv / "bin/python", "-c", CHECK], work).stdout)
    assert found["twinray"] == str(site / "twinray/__init__.py")
    assert found["path"] == [str(site / "twinray")]  # not the checkout's root, as in a source tree
    assert found["losses"] == str(site / "twinray/train/losses/__init__.py")
    assert found["checkout_prep"] is False
    assert found["num_features"] == 512 and found["keys"] > 100  # resnet18's features and its whole state
