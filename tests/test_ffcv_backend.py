"""The FFCV backend: the .beton round trip and the loader contract (shapes, labels, shards, epochs, resume)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from twinray.cli import InputError
from twinray.pipelines.augment import Recipe
from twinray.pipelines.base import LoaderSettings
from twinray.pipelines.ffcv_backend import FFCVLoader
from twinray.pipelines.native import NativeLoader
from twinray.prep.ffcv_pack import write_beton
from twinray.prep.format import LABEL_MISSING, PackedDataset, PackWriter, encode_image

PLAIN = Recipe(name="plain", hflip=0.0)  # crop only: a constant image stays constant


@pytest.fixture(scope="module")
def multilabel_data(tmp_path_factory):
    """12 train samples with random pixels and labels that include blanks."""
    out = tmp_path_factory.mktemp("multilabel")
    rng = np.random.default_rng(0)
    writer = PackWriter(out, "ml", "multilabel", ["x", "y", "z"], "npy", 32, shard_samples=5)
    for k in range(12):
        image = rng.integers(0, 256, (20 + k % 3, 24), dtype=np.uint8)
        labels = {c: [None, 0, 1][(k + j) % 3] for j, c in enumerate("xyz")}
        writer.add("train", encode_image(image, "npy"), *image.shape, {"labels": labels})
    writer.finish({"skipped": []})
    return out


def _values(data: PackedDataset, indices: torch.Tensor) -> torch.Tensor:
    return torch.tensor([data.metadata(int(i))["value"] for i in indices], dtype=torch.float32)


def test_beton_round_trip(constant_data, tmp_path):
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder
    from ffcv.loader import Loader, OrderOption

    path = write_beton(constant_data, "train", tmp_path / "t.beton")
    assert path == tmp_path / "t.beton" and [p.name for p in tmp_path.iterdir()] == ["t.beton"]  # no temp left
    data = PackedDataset(constant_data)
    rows = data.indices("train")
    decoders = {"image": [NDArrayDecoder()], "size": [NDArrayDecoder()], "label": [IntDecoder()], "row": [IntDecoder()]}
    loader = Loader(str(path), 64, 1, order=OrderOption.SEQUENTIAL, pipelines=decoders, drop_last=False)
    ((images, sizes, labels, beton_rows),) = list(loader)
    assert images.shape == (50, 46, 52)  # the split's largest height and width
    assert beton_rows.ravel().tolist() == rows.tolist()
    assert labels.ravel().tolist() == data.labels(rows).tolist()
    for k, i in enumerate(rows):
        image = data.image(i)
        assert sizes[k].tolist() == list(image.shape)
        h, w = image.shape
        assert np.array_equal(images[k, :h, :w], image)
        assert not images[k, h:].any() and not images[k, :, w:].any()  # zero padding


def test_undecodable_sample_fails_the_write_and_leaves_no_beton(tmp_path):
    writer = PackWriter(tmp_path / "bad", "bad", "multiclass", ["a"], "png", 8)
    good = encode_image(np.zeros((8, 8), np.uint8), "png")
    for image in (good, b"not a png", good):
        writer.add("train", image, 8, 8, {"label": 0})
    writer.finish({})
    with pytest.raises(InputError, match="row 1 does not start as png bytes do"):  # nor hangs, as FFCV's writer would
        write_beton(tmp_path / "bad", "train")
    assert list((tmp_path / "bad" / "ffcv").iterdir()) == []


def test_missing_ffcv_is_a_clear_error(constant_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError
    with pytest.raises(ValueError, match=r"needs the ffcv extra: pip install 'twinray\[ffcv\]'"):
        FFCVLoader(constant_data)


def test_the_loader_writes_its_beton_on_first_use(constant_data):
    # The shared contract (shapes, labels, ranks, epochs, resume) is tested for every backend in test_loader.py.
    beton = constant_data / "ffcv" / "train.beton"
    beton.unlink(missing_ok=True)
    loader = FFCVLoader(constant_data, LoaderSettings(batch_size=8, recipe=PLAIN, size=32, seed=1))
    assert beton.is_file() and len(loader) == 6


def test_multilabel_codes(multilabel_data):
    data = PackedDataset(multilabel_data)
    batches = list(FFCVLoader(multilabel_data, LoaderSettings(batch_size=4, recipe=PLAIN, size=16, seed=0)))
    assert len(batches) == 3
    for batch in batches:
        assert batch.labels.dtype == torch.int8 and batch.labels.shape == (4, 3)
        assert torch.equal(batch.labels, torch.from_numpy(data.labels(batch.indices.numpy())))
    assert (torch.cat([b.labels for b in batches]) == LABEL_MISSING).any()


def test_ranks_get_disjoint_equal_shards_and_epochs_reshuffle(constant_data):
    def epoch_indices(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([b.indices for b in loader]).tolist()

    def loader(rank, world):
        return FFCVLoader(
            constant_data,
            LoaderSettings(batch_size=5, recipe=PLAIN, size=16, seed=3, rank=rank, world_size=world, drop_last=False),
        )

    r0, r1, r2 = (epoch_indices(loader(r, 3), 0) for r in range(3))
    assert len(r0) == len(r1) == len(r2) == 16  # 50 // 3
    assert not (set(r0) & set(r1)) and not (set(r1) & set(r2)) and not (set(r0) & set(r2))
    whole = loader(0, 1)
    one = epoch_indices(whole, 0)
    assert sorted(one) == list(range(50))
    assert epoch_indices(whole, 1) != one
    assert epoch_indices(whole, 0) == one


def test_matches_native_and_resumes(covid_packed):
    """Same rows, same pixels, same seeds: the views equal the native backend's; a resumed epoch repeats none."""
    settings = LoaderSettings(batch_size=6, size=32, seed=5)
    ffcv, native = FFCVLoader(covid_packed, settings), NativeLoader(covid_packed, settings)
    ffcv.set_epoch(2)
    native.set_epoch(2)
    full = list(ffcv)
    assert len(full) == len(native)
    for a, b in zip(full, native):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        for va, vb in zip(a.views, b.views):
            assert torch.allclose(va, vb, atol=1e-6)
    ffcv.set_epoch(2, start_step=4)
    resumed = list(ffcv)
    assert len(resumed) == len(full) - 4
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a.indices, b.indices)
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va, vb)
    assert len(list(ffcv)) == len(full)  # resuming applies to one epoch: the next pass is whole
    ffcv.set_epoch(2, start_step=len(full))
    assert list(ffcv) == []


@pytest.mark.gpu
def test_cuda_matches_cpu(covid_packed):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("ffcv", reason="the GPU machine's image has no FFCV")
    kwargs = dict(batch_size=8, size=64, seed=0)
    gpu = next(iter(FFCVLoader(covid_packed, LoaderSettings(device="cuda", **kwargs))))
    cpu = next(iter(FFCVLoader(covid_packed, LoaderSettings(device="cpu", **kwargs))))
    assert gpu.views[0].is_cuda and gpu.labels.is_cuda and gpu.views[0].shape == (8, 1, 64, 64)
    assert torch.equal(gpu.indices, cpu.indices) and torch.equal(gpu.labels.cpu(), cpu.labels)
    assert torch.allclose(gpu.views[0].cpu(), cpu.views[0], atol=1e-4)


def test_discarded_loaders_print_nothing_but_other_finalizer_errors_still_do(constant_data, monkeypatch):
    """ffcv 1.0.2 makes numba's finalizer raise KeyError for each discarded Loader (see
    _drop_numba_finalizer_keyerrors); the backend drops exactly those and passes any other one on."""
    import gc
    import weakref

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    for rank in range(3):  # the second Loader's collection is the first to raise
        loader = FFCVLoader(
            constant_data, LoaderSettings(batch_size=10, recipe=PLAIN, size=16, rank=rank, world_size=3)
        )
        assert sum(len(b.indices) for b in loader) == 10
    del loader
    gc.collect()
    assert seen == []

    class Litter:
        pass

    def fail():
        raise ValueError("a finalizer's own error")

    litter = Litter()
    litter.cycle = litter
    weakref.finalize(litter, fail)
    del litter
    gc.collect()
    assert seen == [ValueError]


def test_an_epoch_left_early_ends_ffcvs_reader_thread(constant_data):
    """ffcv 1.0.2's EpochIterator.close() only sets an event. With the epoch's last batches queued, its reader then
    waits forever to put the end marker; the loader takes a batch out so that it can, and waits for it."""
    import threading
    import time

    def readers() -> list:
        return [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator" and t.is_alive()]

    loader = FFCVLoader(constant_data, LoaderSettings(batch_size=12, recipe=PLAIN, size=16, workers=1), prefetch=3)
    assert len(loader) == 4  # one taken, three queued: the end marker finds the queue full
    epoch = iter(loader)
    next(epoch)
    time.sleep(1.0)  # lets the reader queue the rest and block on the end marker
    assert len(readers()) == 1
    epoch.close()
    assert readers() == []
    loader.close()
