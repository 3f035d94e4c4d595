"""The loader contract on every backend: shapes, label alignment, shards, epochs, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from twinray.cli import InputError
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import Recipe
from twinray.pipelines.native import pad_batch
from twinray.prep.format import PackedDataset

PLAIN = Recipe(name="plain", hflip=0.0)  # crop only: a constant image stays constant
BACKENDS = ["native", "dali", "ffcv"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _values(data: PackedDataset, indices: torch.Tensor) -> torch.Tensor:
    return torch.tensor([data.metadata(int(i))["value"] for i in indices], dtype=torch.float32)


def test_pad_batch_stacks_one_size_and_zero_pads_mixed_sizes():
    same = [torch.full((5, 7), k, dtype=torch.uint8) for k in range(3)]
    batch, sizes = pad_batch(same)
    assert batch.shape == (3, 1, 5, 7) and sizes.tolist() == [[5, 7]] * 3
    assert all(torch.equal(batch[k, 0], same[k]) for k in range(3))
    mixed = [torch.full((1, 4, 6), 9, dtype=torch.uint8), torch.full((6, 3), 8, dtype=torch.uint8)]
    batch, sizes = pad_batch(mixed)
    assert batch.shape == (2, 1, 6, 6) and sizes.tolist() == [[4, 6], [6, 3]]
    assert (batch[0, 0, :4] == 9).all() and (batch[0, 0, 4:] == 0).all()
    assert (batch[1, 0, :, :3] == 8).all() and (batch[1, 0, :, 3:] == 0).all()


def test_batches_have_the_contracted_shapes_and_align_with_labels(constant_data, backend):
    data = PackedDataset(constant_data)
    loader = build_loader(
        constant_data, LoaderSettings(batch_size=8, recipe=PLAIN, size=32, views=3, seed=1), backend=backend
    )
    assert len(loader) == 6  # 50 // 8 with drop_last
    batches = list(loader)
    assert len(batches) == 6
    for batch in batches:
        assert len(batch.views) == 3
        for view in batch.views:
            assert view.shape == (8, 1, 32, 32) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
            # every pixel of a view shows its own sample's constant value
            expected = _values(data, batch.indices)[:, None, None, None] / 255
            assert torch.allclose(view, expected.expand_as(view), atol=1e-5)
        assert batch.labels.dtype == torch.int64 and batch.indices.dtype == torch.int64
        assert batch.labels.tolist() == [data.metadata(int(i))["label"] for i in batch.indices]


def test_a_row_subset_yields_exactly_those_rows_with_their_pixels(constant_data, backend):
    data = PackedDataset(constant_data)
    subset = data.indices("train")[[1, 4, 9, 16, 25, 36, 49]]
    loader = build_loader(
        constant_data,
        LoaderSettings(batch_size=3, recipe=PLAIN, size=16, drop_last=False, rows=subset),
        backend=backend,
    )
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == sorted(subset.tolist())
    for batch in batches:
        expected = _values(data, batch.indices)[:, None, None, None] / 255
        assert torch.allclose(batch.views[0], expected.expand_as(batch.views[0]), atol=1e-5)
    with pytest.raises(ValueError, match="not in split 'train'"):
        build_loader(constant_data, LoaderSettings(rows=[len(data) + 5]), backend=backend)


def test_leaving_an_epoch_early_ends_its_background_thread(constant_data):
    """The native loader's producer may be blocked on a full queue when the consumer leaves; it must still end."""
    import threading

    # 4 batches, 3 prepared ahead: once the consumer has taken one, the producer ends its epoch on a full queue.
    loader = build_loader(constant_data, LoaderSettings(batch_size=12, recipe=PLAIN, size=16, workers=1))
    for _ in range(2):
        epoch = iter(loader)
        next(epoch)
        time.sleep(1.0)  # lets the producer reach its last put
        closer = threading.Thread(target=epoch.close, daemon=True)  # close() joins the producer
        closer.start()
        closer.join(timeout=20)
        assert not closer.is_alive(), "the producer thread did not end"
        assert loader_thread_count() == 0


def loader_thread_count() -> int:
    import threading

    return sum("_producer" in repr(getattr(t, "_target", None)) for t in threading.enumerate())


def test_real_views_are_in_range_and_differ(covid_packed, backend):
    loader = build_loader(covid_packed, LoaderSettings(batch_size=8, size=64, seed=0), backend=backend)
    batch = next(iter(loader))
    a, b = batch.views
    assert a.min() >= 0 and a.max() <= 1 and a.std() > 0.05
    assert not torch.equal(a, b)


def test_ranks_get_disjoint_equal_shards_and_epochs_reshuffle(constant_data, backend):
    def epoch_indices(rank, world, epoch):
        loader = build_loader(
            constant_data,
            LoaderSettings(batch_size=5, recipe=PLAIN, size=16, seed=3, rank=rank, world_size=world, drop_last=False),
            backend=backend,
        )
        loader.set_epoch(epoch)
        return torch.cat([b.indices for b in loader]).tolist()

    r0, r1, r2 = (epoch_indices(r, 3, 0) for r in range(3))
    assert len(r0) == len(r1) == len(r2) == 16  # 50 // 3
    assert not (set(r0) & set(r1)) and not (set(r1) & set(r2)) and not (set(r0) & set(r2))
    one = epoch_indices(0, 1, 0)
    assert sorted(one) == list(range(50))
    assert epoch_indices(0, 1, 1) != one


def test_resume_mid_epoch_repeats_nothing(covid_packed, backend):
    loader = build_loader(covid_packed, LoaderSettings(batch_size=6, size=32, seed=5), backend=backend)
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_step=4)
    resumed = list(loader)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a.indices, b.indices)
        for va, vb in zip(a.views, b.views):  # the very same views (DALI replays the skipped batches)
            assert torch.equal(va, vb)
    again = list(loader)  # resuming applies to one epoch: the next pass is whole
    assert len(again) == len(full)


def test_same_seed_same_batches(covid_packed):
    a = next(iter(build_loader(covid_packed, LoaderSettings(batch_size=4, size=32, seed=9))))
    b = next(iter(build_loader(covid_packed, LoaderSettings(batch_size=4, size=32, seed=9))))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.views[0], b.views[0])


def test_bad_backend_and_split_are_clear(covid_packed):
    with pytest.raises(ValueError, match="backend 'tfrecord' is not one of native, dali, ffcv"):
        build_loader(covid_packed, backend="tfrecord")
    with pytest.raises(Exception, match="split 'dev'"):
        build_loader(covid_packed, LoaderSettings(split="dev"))


@pytest.mark.gpu
def test_cuda_decodes_jpeg_on_the_gpu(covid_packed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    loader = build_loader(covid_packed, LoaderSettings(batch_size=8, device="cuda", size=64, seed=0))
    assert loader.gpu_jpeg
    batch = next(iter(loader))
    assert batch.views[0].is_cuda and batch.views[0].shape == (8, 1, 64, 64)
    cpu = next(iter(build_loader(covid_packed, LoaderSettings(batch_size=8, device="cpu", size=64, seed=0))))
    assert torch.equal(batch.indices, cpu.indices)


def test_missing_dali_is_one_clear_line(covid_packed, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"
        "from pipelines import build_loader\n"
        f"build_loader({str(covid_packed)!r}, backend='dali')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "backend 'dali' needs the dali extra: pip install 'twinray[dali]'" in result.stderr


def test_dali_noise_and_jitter_follow_the_recipe(constant_data):
    data = PackedDataset(constant_data)
    noisy = Recipe(name="noise", hflip=0.0, noise=1.0, noise_mean_fraction=(0.06, 0.1))
    batch = next(
        iter(build_loader(constant_data, LoaderSettings(batch_size=16, recipe=noisy, size=32, seed=2), backend="dali"))
    )
    values = _values(data, batch.indices) / 255
    ratio = (batch.views[0] - values[:, None, None, None]).flatten(1).std(1) / values
    keep = values > 0.1  # away from clipping at 0
    assert ((ratio[keep] > 0.05) & (ratio[keep] < 0.11)).all(), ratio
    jitter = Recipe(name="jitter", hflip=0.0, brightness_contrast=1.0, brightness=0.4, contrast=0.0)
    batch = next(
        iter(build_loader(constant_data, LoaderSettings(batch_size=16, recipe=jitter, size=32, seed=2), backend="dali"))
    )
    factor = batch.views[0].flatten(1).mean(1) / (_values(data, batch.indices) / 255)
    unclipped = _values(data, batch.indices) < 150
    assert ((factor[unclipped] > 0.59) & (factor[unclipped] < 1.41)).all() and factor.std() > 0.05


def _damaged_copy(packed, tmp_path, start: int, stop: int) -> tuple[Path, int]:
    """A copy of `packed` with bytes [start, stop) of one train image zeroed; returns it and the row."""
    root = tmp_path / "damaged"
    shutil.copytree(packed, root, ignore=shutil.ignore_patterns("ffcv"))
    data = PackedDataset(root)
    row = int(data.indices("train")[3])
    offset, shard = int(data.index[row]["offset"]), root / data.shard_names[int(data.index[row]["shard"])]
    data.close()
    raw = bytearray(shard.read_bytes())
    raw[offset + start : offset + stop] = bytes(stop - start)
    shard.write_bytes(bytes(raw))
    return root, row


def test_a_damaged_image_stops_every_backend_with_its_shard_and_row(covid_packed, backend, tmp_path):
    root, row = _damaged_copy(covid_packed, tmp_path, 0, 16)
    with pytest.raises(InputError, match=rf"train-\d+\.tar: row {row} does not start as jpeg bytes do; .*verify"):
        for _ in build_loader(
            root, LoaderSettings(batch_size=8, recipe=PLAIN, size=16, seed=0, drop_last=False), backend=backend
        ):
            pass  # the FFCV backend fails while writing its beton, the others while loading


@pytest.mark.parametrize("backend", ["native", "dali"])  # FFCV decodes nothing: its beton holds raw pixels
def test_a_gpu_decoders_error_is_named_by_decoding_its_rows_on_the_cpu(covid_packed, backend, tmp_path):
    """nvJPEG's and DALI's errors name no image, and DALI may crash instead of raising, so this is not run through
    them: the loaders hand the rows the decoder was working on to `name_undecodable`."""
    root, row = _damaged_copy(covid_packed, tmp_path, 8, 300)  # the JPEG signature stays
    loader = build_loader(root, LoaderSettings(batch_size=8, recipe=PLAIN, size=16, seed=0), backend=backend)
    order = loader.epoch_order()
    decoder_error = RuntimeError("nvjpeg: decode failed")
    named = loader.name_undecodable(order, decoder_error)
    assert isinstance(named, InputError) and f"row {row}: jpeg member does not decode" in str(named)
    assert loader.name_undecodable(order[order != row], decoder_error) is decoder_error


@pytest.mark.gpu
def test_cuda_names_a_jpeg_that_nvjpeg_cannot_decode(covid_packed, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    root, row = _damaged_copy(covid_packed, tmp_path, 8, 300)
    with pytest.raises(InputError, match=rf"row {row}: jpeg member does not decode"):
        for _ in build_loader(root, LoaderSettings(batch_size=8, device="cuda", size=16, seed=0, drop_last=False)):
            pass


def _os_threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def test_close_ends_every_thread_the_loader_started(constant_data, backend):
    """An epoch left open mid-way (its iterator suspended, as a loop left by an exception leaves it) is ended by
    close(), which waits for its threads, decode pool and pipeline: none is left for the interpreter's shutdown."""
    settings = LoaderSettings(batch_size=8, recipe=PLAIN, size=16, workers=2, seed=0)
    with build_loader(
        constant_data, settings, backend=backend
    ) as warm:  # process-wide pools (OpenMP, numba's) start once and stay
        for _ in warm:
            pass
    before, python_before = _os_threads(), set(threading.enumerate())
    with build_loader(constant_data, settings, backend=backend) as loader:
        epoch = iter(loader)
        next(epoch)
        next(epoch)
        assert _os_threads() - before, "the epoch runs threads of its own"
    assert set(threading.enumerate()) <= python_before  # producer, decode pool, FFCV's reader: joined by close()
    # Native threads too (DALI's). An OpenMP team that a joined thread led ends just after it: allow a moment.
    deadline = time.monotonic() + 10
    while not _os_threads() <= before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _os_threads() <= before
    with pytest.raises(StopIteration):
        next(epoch)  # closed with the loader
    with pytest.raises(RuntimeError, match="closed"):
        iter(loader)
    loader.close()  # twice is fine


OPEN_EPOCHS_AT_EXIT = """
import sys
from twinray.pipelines import LoaderSettings, build_loader

epochs = []  # kept to the end: iterators suspended mid-epoch, as a loop left by an exception leaves them
for backend in ("ffcv", "dali", "native"):  # ffcv first (writing its beton forks); native last, busy at exit
    loader = build_loader(sys.argv[1], LoaderSettings(batch_size=4, size=128, workers=2, seed=0), backend=backend)
    epoch = iter(loader)
    next(epoch)
    epochs.append(epoch)
print("done", flush=True)
"""


@pytest.mark.slow
def test_a_process_that_leaves_every_backend_mid_epoch_exits_normally(constant_data, tmp_path):
    """A producer thread still inside a torch op when the interpreter shuts down is unwound by pthread_exit through
    a noexcept scope: std::terminate, "terminate called without an active exception", exit code 134. Before the
    loaders closed themselves at exit this script aborted in 4 runs of 4; the loaders now end their threads in an
    atexit hook, while the interpreter is whole."""
    script = tmp_path / "open_epochs.py"
    script.write_text(OPEN_EPOCHS_AT_EXIT)
    for _ in range(2):  # it aborted in every run before; each run costs the imports of torch, DALI and FFCV
        run = subprocess.run([sys.executable, script, constant_data], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-3000:]
        assert run.stdout.strip() == "done"


def test_the_pipeline_benchmark_over_every_backend_exits_normally(constant_data, tmp_path):
    """The issue's command, small: every backend and the study's DataLoader in one process, several epochs each."""
    args = ["--data", constant_data, "--device", "cpu", "--backends", "native,dali,ffcv,baseline", "--size", "32"]
    args += ["--batch-size", "8", "--batches", "10", "--warmup", "1", "--json", tmp_path / "pipeline.json"]
    env = {**os.environ, "TWINRAY_BENCH_RESULTS": str(tmp_path / "results")}
    run = subprocess.run(
        [sys.executable, REPO / "bench" / "pipeline.py", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-3000:]
    results = json.loads((tmp_path / "pipeline.json").read_text())["results"]
    assert set(results) == {"native", "dali", "ffcv", "baseline"}
