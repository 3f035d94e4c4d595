"""A full disk, for real: a small tmpfs mounted in a mount namespace of the test's own (`unshare`, so the mount goes
with the process), where prep rebuilds a dataset and pretraining writes a checkpoint. Each is one line naming the path
and exit code 2; what was there before is intact and nothing half-written is published (twinray.cli.run_cli)."""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error
from twinray.prep import sample
from twinray.prep.cli import main as prep_main

NAMESPACES = (
    ["unshare", "--mount", "--propagation", "private"],  # root with CAP_SYS_ADMIN
    ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],  # anyone, where user ns exist
)


@functools.cache
def namespace() -> list[str]:
    """The first way of mounting a tmpfs that works here. Fails (never skips) when none does: the test cannot fill a
    disk for real then."""
    tried = []
    with tempfile.TemporaryDirectory() as probe:
        for prefix in NAMESPACES:
            try:
                result = subprocess.run(
                    [*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", probe], capture_output=True, text=True
                )
            except FileNotFoundError as e:
                tried.append(str(e))
                continue
            if result.returncode == 0:
                return prefix
            tried.append(f"{' '.join(prefix)}: {result.stderr.strip()}")
    pytest.fail(f"cannot mount a small tmpfs to fill: {'; '.join(tried)}")


def on_small_disk(disk: Path, kib: int, script: str, after: Path) -> subprocess.CompletedProcess:
    """Runs bash `script` with a tmpfs of `kib` KiB at `disk`, then copies what the disk holds to `after` (the mount
    is gone once the process ends). The result is the script's."""
    disk.mkdir()
    after.mkdir()
    body = (
        f"mount -t tmpfs -o size={kib}k tmpfs {disk} || exit 97\n{script}\nrc=$?\ncp -a {disk}/. {after}/ && exit $rc"
    )
    result = subprocess.run([*namespace(), "bash", "-c", body], capture_output=True, text=True, cwd=REPO)
    assert result.returncode != 97, result.stderr
    return result


def kib_used(root: Path) -> int:
    """What `root`'s files take on a tmpfs: whole 4 KiB pages."""
    return sum(4 * math.ceil(p.stat().st_size / 4096) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(24 generated images, their packed dataset at 64 px)."""
    raw = sample.generate(tmp_path_factory.mktemp("raw"), n=24, seed=2, metadata=False)
    packed = tmp_path_factory.mktemp("packed") / "covid"
    assert prep_main(["covid", "--src", str(raw), "--out", str(packed), "--workers", "1", "--size", "64"]) == 0
    return raw, packed


def test_prep_on_a_full_disk_is_one_line_and_keeps_the_old_dataset(small_dataset, tmp_path):
    raw, old = small_dataset
    disk, after = tmp_path / "disk", tmp_path / "after"
    used = kib_used(old)
    command = [sys.executable, "-m", "prep", "covid", "--src", raw, "--out", disk / "covid", "--workers", "1"]
    script = f"cp -a {old} {disk}/covid\n{shlex.join(map(str, command))} --size 64 --force"
    result = on_small_disk(disk, used + used // 2, script, after)  # room for half a rebuild
    assert_one_line_error(result, f"prep: error: {disk}/covid: no space left on the device (ENOSPC)")
    assert sorted(p.name for p in after.iterdir()) == [".covid.lock", "covid"]  # no temporary folder left
    assert {p.name: p.read_bytes() for p in (after / "covid").iterdir()} == {
        p.name: p.read_bytes() for p in old.iterdir()
    }


def test_pretraining_on_a_full_disk_is_one_line_and_publishes_no_checkpoint(small_dataset, tmp_path):
    _, data = small_dataset
    disk, after = tmp_path / "disk", tmp_path / "after"
    command = [
        sys.executable, "train/pretrain.py", "--data", data, "--out", disk / "run", "--epochs", "1", "--size", "32",
        "--batch-size", "8", "--workers", "1", "--max-steps", "1", "--no-compile", "--wandb", "disabled",
    ]  # fmt: skip
    result = on_small_disk(disk, 1024, shlex.join(map(str, command)), after)  # a checkpoint here is ~45 MB
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    progress = re.compile(r"^epoch \d+/\d+: \d+/\d+ ")  # the plain progress lines off a terminal (train/runlog.py)
    said = [line for line in result.stderr.splitlines() if line.strip() and not progress.match(line)]
    assert said == [
        f"pretrain: error: {disk}/run/ckpt-000000001: no space left on the device (ENOSPC): free some space there "
        "or write elsewhere"
    ]
    # no half-written checkpoint; train.log has its header, and claims no epoch or end
    assert sorted(p.name for p in (after / "run").iterdir()) == ["config.json", "train.log"]
    log = (after / "run" / "train.log").read_text()
    assert log.startswith("==== started ") and "epoch 1/1" not in log and "done" not in log
    assert json.loads((after / "run" / "config.json").read_text())["out"] == str(disk / "run")


def test_a_full_disk_without_a_file_name_is_named_by_its_writer(tmp_path):
    import errno

    from twinray.atomic import naming
    from twinray.cli import disk_full_message

    with pytest.raises(OSError) as caught, naming(tmp_path / "x.json"):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert disk_full_message(caught.value) == (
        f"{tmp_path / 'x.json'}: no space left on the device (EDQUOT: the disk quota is used up): free some space "
        "there or write elsewhere"
    )
    with pytest.raises(OSError) as caught, naming(tmp_path / "t.safetensors"):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "t.safetensors")
