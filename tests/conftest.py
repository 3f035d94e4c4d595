from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twinray.prep import sample
from twinray.prep.cli import main as prep_main
from twinray.prep.format import PackWriter, encode_image

REPO = Path(__file__).resolve().parents[1]
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on CI's two cores. Each worker and the scripts it starts use one
    # thread: two workers of two OpenMP threads each on two cores spin against each other and ran steps many times
    # slower than one thread each.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
HAVE_OPENPYXL = importlib.util.find_spec("openpyxl") is not None  # absent on the GPU machine only; see covid_sample


def pytest_collection_modifyitems(items):
    """Tests marked `slow` run first, so that with two workers none of them starts last and runs alone at the end.
    The sort is stable and the same in every worker, as pytest-xdist requires."""
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Only GPU-marked tests may skip: a skip anywhere else (a missing dependency, say) is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and "gpu" not in item.keywords and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped without the gpu marker, which CI does not allow: {report.longrepr}"


@pytest.fixture(autouse=True)
def keep_signals():
    """Every test: train() installs its SIGTERM/SIGINT handlers (pretrain and lr_find run in process); pytest's
    come back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="session")
def covid_sample(tmp_path_factory) -> Path:
    """A small generated COVID-19_Radiography_Dataset (read-only: copy it before changing it).

    The metadata xlsx needs openpyxl, which the GPU machine's image lacks; CI has it (test_covid imports it, and
    test_sample_json_holds_source_split_label_origin fails without the metadata)."""
    return sample.generate(tmp_path_factory.mktemp("sample"), n=60, seed=1, metadata=HAVE_OPENPYXL)


@pytest.fixture(scope="session")
def covid_packed(covid_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "covid"
    assert (
        prep_main(["covid", "--src", str(covid_sample), "--out", str(out), "--workers", "1", "--shard-samples", "16"])
        == 0
    )
    return out


@pytest.fixture(scope="session")
def demo_packed(tmp_path_factory) -> Path:
    """The demo's dataset: 400 generated images, packed (320 train)."""
    raw = sample.generate(tmp_path_factory.mktemp("demo-raw"), n=400, seed=0, workers=2, metadata=HAVE_OPENPYXL)
    out = tmp_path_factory.mktemp("demo") / "packed"
    assert prep_main(["covid", "--src", str(raw), "--out", str(out), "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def constant_data(tmp_path_factory) -> Path:
    """50 train samples; sample k is a constant image of value 5k+3 and label k % 4, sizes vary."""
    out = tmp_path_factory.mktemp("constant")
    writer = PackWriter(out, "constant", "multiclass", ["a", "b", "c", "d"], "png", 64, shard_samples=16)
    for k in range(50):
        image = np.full((40 + k % 7, 48 + k % 5), 5 * k + 3, np.uint8)
        writer.add("train", encode_image(image, "png"), *image.shape, {"label": k % 4, "value": 5 * k + 3})
    writer.finish({"skipped": []})
    return out


def run_prep(*args: str) -> subprocess.CompletedProcess:
    """`python -m prep ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "prep", *map(str, args)], capture_output=True, text=True, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3-compatible server (moto's, tests/s3server.py) on 127.0.0.1 with a bucket `twinray`, for this
    session; its test credentials are in the environment while it runs."""
    from tests.s3server import CREDENTIALS, S3Server

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = S3Server()
    try:
        server.filesystem().mkdir("twinray")
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_covid(s3, covid_sample) -> str:
    """covid_packed's dataset, packed by `prep covid --out s3://twinray/covid` (same arguments): its URL."""
    url = "s3://twinray/covid"
    args = ["covid", "--src", str(covid_sample), "--out", url, "--workers", "1", "--shard-samples", "16"]
    assert prep_main([*args, "--storage-options", s3.storage_options_json]) == 0
    return url
