from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

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


# What the process starts with, to put back after every test: a module- or session-scoped fixture that runs a tool
# in process (tests/test_rerun_pretrain.py's `stopped`) would otherwise become the "before" of each test after it.
SIGNALS = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
DETERMINISTIC = torch.are_deterministic_algorithms_enabled()


@pytest.fixture(autouse=True)
def keep_process_state():
    """Every test: what a tool's main() run in this process (`twinray_here`) may change comes back afterwards:
    train()'s SIGTERM/SIGINT handlers and `--deterministic`'s torch.use_deterministic_algorithms, as the process
    started with them; the environment (`--wandb offline` sets WANDB_MODE) as the test found it, since the `s3`
    fixture sets the server's credentials for the session. Only changed variables are written back (threads that
    outlive a test may read the environment). Not restored: torch's and numpy's global random state (each tool seeds
    its own) and accelerate's process-wide state, which fixes the first Accelerator's mixed precision for the rest of
    the process (a bf16 run in process after an fp32 one raises ValueError): tests/test_pretrain.py runs bf16 in a
    process of its own."""
    environ = dict(os.environ)
    yield
    for s, handler in SIGNALS.items():
        signal.signal(s, handler)
    torch.use_deterministic_algorithms(DETERMINISTIC)
    for name in os.environ.keys() - environ.keys():
        del os.environ[name]
    for name, value in environ.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def twinray_here(capsys, command: str, *args) -> subprocess.CompletedProcess:
    """`twinray COMMAND ARGS` in this process: twinray.command.main, which runs the tool's main() as its
    `__main__` block does (the same one-line errors and exit codes), with stdout and stderr captured. What a
    subprocess would give, without its 5 to 10 s of imports; for tests that check nothing of the process itself
    (signals, pipes, start-up). The usage line names `twinray COMMAND`.

    stderr holds what a process would print there beyond sys.stderr: warnings (but DeprecationWarning, which Python
    hides outside __main__) and log records of WARNING and above (Python's last-resort handler), which pytest would
    otherwise keep for itself, so a one-line check still sees them. Not seen: writes to file descriptor 2 from C code
    or from child processes."""
    import logging
    import warnings

    from twinray.command import main

    argv = [str(a) for a in args]
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = main([command, *argv])
    finally:
        logging.getLogger().removeHandler(handler)
    captured = capsys.readouterr()
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    err = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in shown) + captured.err
    return subprocess.CompletedProcess([command, *argv], code, captured.out, err)


def hub_offline(monkeypatch, cache: Path) -> None:
    """huggingface_hub offline, with `cache` as its empty cache, for this test: the environment variables, and the
    module constants it read from them when it was imported (earlier, in this process). With the variables alone it
    tried the network, and its retries took 47 s of CI before the same line came back."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


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


# The distributed harness. Two ways to run several processes on the CPU with gloo: `gloo` spawns them from the test
# and runs one function in each; `run_torchrun` launches a real script under torchrun. torch is imported inside
# (as at the top, only under xdist): tests that never start a process group do not pay its import.

GLOO_ENV = {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # a launched script's processes: gloo, 1 thread


def free_port() -> int:
    """A loopback port free now (another process may still take it before it is bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_path() -> str:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun is missing from the venv"
    return torchrun


def torchrun(*args, nproc: int = 2) -> list[str]:
    """The command line of a one-machine torchrun of `nproc` processes at a free port, then ARGS."""
    return [torchrun_path(), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *map(str, args)]


def run_torchrun(*args, nproc: int = 2, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun ARGS` of `nproc` CPU processes (GLOO_ENV) in the repository, its output captured."""
    return subprocess.run(
        torchrun(*args, nproc=nproc),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **GLOO_ENV, **(env or {})},
        timeout=timeout,
    )


def _gloo_rank(rank: int, fn, args: tuple, world: int, rendezvous: str, out_dir: str) -> None:
    """One spawned process of `gloo`: join the group, save fn(rank, *args) for the test, leave the group."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        torch.save(fn(rank, *args), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo(tmp: Path, fn, *args, world: int = 2, timeout_s: float = 60.0) -> list:
    """fn(rank, *args) in each of `world` spawned processes of one gloo group (rendezvous and results in `tmp`):
    their results by rank. fn must be importable (a module-level function) and its result torch.save-able; a
    process's exception is raised here, and processes still running after timeout_s are killed and fail the test."""
    import torch
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _gloo_rank,
        args=(fn, args, world, str(tmp / "rendezvous"), str(tmp)),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):  # re-raises a process's exception
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {world} gloo workers did not finish within {timeout_s:.0f} s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="session")
def gloo(tmp_path_factory):
    """run(fn, *args, world=2, timeout_s=60): run_gloo in a fresh temporary folder. Session-scoped, so that a
    module's fixture can spawn once for all its tests."""

    def run(fn, *args, world: int = 2, timeout_s: float = 60.0) -> list:
        return run_gloo(tmp_path_factory.mktemp("gloo"), fn, *args, world=world, timeout_s=timeout_s)

    return run


def correlated_views(n, d, seed=0, dtype=torch.float32, scale=(0.5, 3.0), offset=(-2.0, 5.0), mix=0.7):
    """Two correlated n x d views with per-feature offsets and scales, as a projector's outputs look: z1 scaled
    linearly over the features from scale[0] to scale[1] and shifted from offset[0] to offset[1], z2 = mix * z1 plus
    unit noise; seeded, so each test's inputs are fixed. The loss tests' shared input."""
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, d, generator=g) * torch.linspace(*scale, d) + torch.linspace(*offset, d)
    z2 = mix * z1 + torch.randn(n, d, generator=g)
    return z1.to(dtype), z2.to(dtype)
