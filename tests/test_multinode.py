"""Two "nodes" on one machine: two torchrun agents (--nnodes 2 --nproc_per_node 1) meeting at a c10d rendezvous on
127.0.0.1, gloo on the CPU, pretraining from an S3 URL (the `s3` fixture's server), each node with its own shard
cache as separate machines would have. Stopped mid-epoch by SIGTERM, resumed by the same launch, then on one
process (another world size)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import GLOO_ENV, REPO, free_port, torchrun_path, twinray_here
from twinray.prep import shard_cache
from twinray.train import checkpoint

TINY = ["--size", "32", "--batch-size", "4", "--projector", "64", "--wandb", "disabled", "--workers", "1"]


def launch_two_nodes(s3, url, out, caches, *args) -> list[subprocess.Popen]:
    """One torchrun agent per node, each in its own process group (so that a signal reaches the agent and its
    worker at once, as a scheduler's does)."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [
        start(
            [
                torchrun_path(),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                f"twinray-{out.name}",
                "--max_restarts",
                "0",
                "train/pretrain.py",
                "--data",
                url,
                "--out",
                str(out),
                "--shard-cache",
                str(cache),
                "--storage-options",
                s3.storage_options_json,
                *TINY,
                *args,
            ],
            s3,
            start_new_session=True,
        )  # fmt: skip
        for cache in caches
    ]


def start(command: list[str], s3, **popen) -> subprocess.Popen:
    """A launcher of this machine's CPU processes (GLOO_ENV) that talk to `s3`, its output piped."""
    env = {**s3.env(), **GLOO_ENV}
    return subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )


def finish(agents, timeout=600) -> list[tuple[str, str]]:
    outputs = [a.communicate(timeout=timeout) for a in agents]
    return outputs


def steps_logged(out) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "epoch_end" not in line]


@pytest.mark.slow
def test_two_nodes_from_s3_stop_mid_epoch_resume_then_resume_on_one_process(s3, s3_covid, tmp_path, capsys):
    out = tmp_path / "run"
    caches = [tmp_path / "node0-cache", tmp_path / "node1-cache"]
    args = ["--epochs", "2", "--log-every", "1"]  # 48 train images, global batch 4: 12 steps per epoch

    agents = launch_two_nodes(s3, s3_covid, out, caches, *args)
    deadline = time.time() + 400
    while time.time() < deadline:  # stop it once the first steps are logged, well before the epoch ends
        if (out / "metrics.jsonl").exists() and len(steps_logged(out)) >= 2:
            break
        if any(a.poll() is not None for a in agents):
            break
        time.sleep(0.05)
    for agent in agents:
        os.killpg(agent.pid, signal.SIGTERM)
    outputs = finish(agents)
    worker_output = "".join(o + e for o, e in outputs)
    assert "stopped (SIGTERM)" in worker_output, worker_output[-3000:]
    assert not (out / "backbone.safetensors").exists()
    position = checkpoint.load(checkpoint.latest(out))["position"]
    assert position["epoch"] == 0 and 0 < position["in_epoch"] < 12  # mid-epoch
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["nodes"]) == (2, 2)

    agents = launch_two_nodes(s3, s3_covid, out, caches, *args)
    outputs = finish(agents)
    assert all(a.returncode == 0 for a in agents), [e[-3000:] for _, e in outputs]
    assert "resuming from ckpt-" in "".join(o for o, _ in outputs)
    steps = steps_logged(out)
    assert steps == list(range(1, 25))  # every step of 2 epochs once: none repeated, none skipped
    assert (out / "backbone.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["nodes"], config["data"]) == (2, 2, s3_covid)
    for cache in caches:  # each node fetched the train split into its own cache, each shard once
        (local,) = cache.iterdir()
        fetched = [e["file"] for e in shard_cache.read_log(local) if e["event"] == "fetch" and e["ok"]]
        train = [f for f in fetched if f.startswith("train-")]
        assert sorted(train) == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]

    # Another world size: one process continues from the 2-process checkpoint (the step carries over; the epoch's
    # sample order is dealt to 1 rank instead of 2, so it is not the same sample set an unchanged run would see).
    one = twinray_here(
        capsys, "pretrain", "--data", s3_covid, "--out", out, "--shard-cache", caches[0],
        "--storage-options", s3.storage_options_json, *TINY, "--epochs", "3", "--log-every", "1",
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resuming from ckpt-" in one.stdout
    assert steps_logged(out) == list(range(1, 37))
    assert json.loads((out / "config.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_accelerate_launch_on_two_machines_records_two_nodes(s3, s3_covid, tmp_path):
    """docs/distributed.md's multi-node `accelerate launch` form, one process per "machine" on 127.0.0.1 (GPUs:
    --multi_gpu; here ACCELERATE_USE_CPU makes its processes use gloo on the CPU)."""
    port, out = free_port(), tmp_path / "run"
    machines = [
        start(
            [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_machines",
                "2",
                "--num_processes",
                "2",
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "train/pretrain.py",
                "--data",
                s3_covid,
                "--out",
                str(out),
                "--shard-cache",
                str(tmp_path / f"machine{rank}-cache"),
                "--storage-options",
                s3.storage_options_json,
                *TINY,
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--log-every",
                "1",
            ],
            s3,
        )  # fmt: skip
        for rank in (0, 1)
    ]
    outputs = finish(machines)
    assert all(m.returncode == 0 for m in machines), [e[-3000:] for _, e in outputs]
    config = json.loads((out / "config.json").read_text())
    assert (config["world_size"], config["nodes"]) == (2, 2)
    assert steps_logged(out) == [1, 2]


def test_a_global_step_holds_the_same_samples_whatever_the_world_size():
    """What resuming on another world size keeps (docs/distributed.md): global step k covers the same rows, except
    for the epoch's tail that is cut to a multiple of the world size."""
    from twinray.pipelines.base import rank_order

    rows, global_batch = np.arange(1000, 1050), 8

    def step_rows(world: int, step: int) -> set[int]:
        per_rank = global_batch // world
        return {
            int(r)
            for rank in range(world)
            for r in rank_order(rows, 3, 7, rank, world)[step * per_rank : (step + 1) * per_rank]
        }

    for step in range(6):  # 50 rows, batch 8: 6 full steps
        assert step_rows(1, step) == step_rows(2, step) == step_rows(4, step)
    assert len(step_rows(1, 0)) == global_batch
