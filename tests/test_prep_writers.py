"""Two prep runs into the same --out: one publishes; the other refuses in one line while it runs, or finds the
dataset complete afterwards. Neither replaces the other's finished dataset without --force (prep/build.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from twinray.lock import exclusive
from twinray.prep import sample
from twinray.prep.cli import main as prep_main


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return sample.generate(tmp_path_factory.mktemp("raw"), n=24, seed=3, metadata=False)


def args(raw, out, *more: str) -> list[str]:
    return ["covid", "--src", str(raw), "--out", str(out), "--workers", "1", "--size", "32", *more]


def files(root) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in root.iterdir()}


def test_a_prep_while_another_writes_the_same_out_is_refused_in_one_line(raw, tmp_path, capsys):
    out = tmp_path / "covid"
    with exclusive(out, "prep"):  # another prep, between its check of --out and its publish
        assert prep_main(args(raw, out)) == 2
        assert not out.exists() and not list(tmp_path.glob(".covid.tmp-*"))
    assert capsys.readouterr().err == (
        f"prep: error: {out}: another prep is writing to it now (lock {tmp_path / '.covid.lock'}); wait for it to "
        "finish or use another --out\n"
    )
    assert prep_main(args(raw, out)) == 0
    assert capsys.readouterr().out.startswith(f"packed 24 images into {out}")
    published = files(out)
    with exclusive(out, "prep"):  # --force is refused too while the other runs: its dataset stays
        assert prep_main(args(raw, out, "--force", "--size", "48")) == 2
    assert files(out) == published
    capsys.readouterr()
    assert prep_main(args(raw, out)) == 0  # done: complete, left alone without --force
    assert capsys.readouterr().out.startswith(f"already packed (use --force to rebuild): 24 images into {out}")
    assert prep_main(args(raw, out, "--size", "48")) == 2  # not "already packed": it holds another size
    assert "holds a dataset packed with other settings: size 32, now 48" in capsys.readouterr().err
    assert files(out) == published


def test_two_prep_processes_at_once_publish_one_dataset(raw, tmp_path):
    out = tmp_path / "covid"
    command = [sys.executable, "-m", "prep", *args(raw, out)]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    runs.append(subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    said = [run.communicate(timeout=120) for run in runs]
    results = [(run.returncode, out_text, err_text) for run, (out_text, err_text) in zip(runs, said)]
    packed = [r for r in results if r[0] == 0 and r[1].startswith("packed 24 images")]
    assert len(packed) == 1, results  # one publishes; the other refused, or found it complete
    (other,) = [r for r in results if r is not packed[0]]
    assert (other[0] == 2 and "another prep is writing to it now" in other[2]) or (
        other[0] == 0 and other[1].startswith("already packed")
    ), other
    assert sorted(p.name for p in tmp_path.iterdir()) == [".covid.lock", "covid"]  # no temporary folder left
    assert prep_main(["verify", str(out)]) == 0
