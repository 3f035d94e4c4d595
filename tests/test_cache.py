"""The native loader's resident cache (pipelines/cache.py): the same batches and views as decoding every epoch, its
size, the auto choice, and damaged data named while it fills."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from twinray.cli import InputError
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.cache import DEVICE_FRACTION, HOST_FRACTION, cache_bytes, choose
from twinray.prep.format import PackedDataset, PackWriter, encode_image

GB = 10**9


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    """30 train JPEGs, portrait and landscape (32 to 40 px on the long side), textured, so that crops, padding and
    every op of seed-final show in the pixels; labels k % 3."""
    out = tmp_path_factory.mktemp("cache") / "mixed"
    writer = PackWriter(out, "mixed", "multiclass", ["a", "b", "c"], "jpeg", 32, shard_samples=8)
    rng = np.random.default_rng(0)
    for k in range(30):
        h, w = (32, 32 + k % 9) if k % 2 else (32 + k % 7, 32)
        image = np.add.outer(np.arange(h) * 3, np.arange(w) * 2) + rng.integers(0, 80, (h, w))
        writer.add("train", encode_image(image.clip(0, 255).astype(np.uint8), "jpeg"), h, w, {"label": k % 3})
    writer.finish({"skipped": []})
    return out


def epochs(root, cache: str, epochs=(0, 1), start_step: int = 0, device="cpu", **kw) -> list:
    """Every batch of `epochs` (the first resumed at `start_step`), seed-final at 16 px, batch 7, last batch kept;
    `kw` more LoaderSettings fields."""
    settings = LoaderSettings(batch_size=7, size=16, seed=3, drop_last=False, device=device, workers=1, **kw)
    loader = build_loader(str(root), settings, cache=cache)
    batches = []
    for k, epoch in enumerate(epochs):
        loader.set_epoch(epoch, start_step if k == 0 else 0)
        batches += list(loader)
    return batches


def assert_same_batches(expected: list, got: list) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert len(a.views) == len(b.views) == 2
        for va, vb in zip(a.views, b.views):
            assert torch.equal(va, vb)  # bit-identical, not close


@pytest.mark.parametrize("cache", ["host", "device"])
def test_cached_views_are_bit_identical_to_decoding_every_epoch(mixed_sizes, cache):
    uncached = epochs(mixed_sizes, "none")
    assert_same_batches(uncached, epochs(mixed_sizes, cache))
    with build_loader(str(mixed_sizes), LoaderSettings(batch_size=7, size=16), cache=cache) as loader:
        assert f"cache {cache} (asked for)" in loader.cache_note
    # resumed mid-epoch: the rest of epoch 0, then epoch 1, as an uninterrupted run gives them
    assert_same_batches(uncached[2:], epochs(mixed_sizes, cache, start_step=2))
    # another rank's shard
    assert_same_batches(
        epochs(mixed_sizes, "none", rank=1, world_size=2), epochs(mixed_sizes, cache, rank=1, world_size=2)
    )


def test_cache_holds_each_image_at_its_size_in_one_padded_tensor(mixed_sizes):
    data = PackedDataset(mixed_sizes)
    rows = data.indices("train")[::2]  # a row subset (a label fraction) caches only its own rows
    loader = build_loader(str(mixed_sizes), LoaderSettings(batch_size=4, size=16, workers=1, rows=rows), cache="host")
    cache = loader.cache
    assert cache.pixels.shape == (15, 1, 38, 32)  # rows 0, 2, ..., 28: heights 32..38, widths 32
    assert cache.nbytes == cache_bytes(data, rows) == 15 * 38 * 32 + 16 * 15
    assert cache.filled == 0  # filled when the first epoch starts
    next(iter(loader))
    assert cache.full
    for slot, row in enumerate(rows):
        image = torch.from_numpy(data.image(int(row)))
        h, w = image.shape
        assert cache.sizes[slot].tolist() == [h, w]
        assert torch.equal(cache.pixels[slot, 0, :h, :w], image)
        assert not cache.pixels[slot, 0, h:].any() and not cache.pixels[slot, 0, :, w:].any()  # zero padding


def test_auto_picks_device_then_host_then_none_and_says_why():
    needed = 14 * GB  # CheXpert-small's frontal views, say
    mode, why = choose("auto", needed, "cuda", device_free=40 * GB, ram_available=100 * GB)
    assert mode == "device" and why == (
        "cache auto -> device: the decoded images take 14.00 GB, which fits in 50% of the 40.00 GB free on the device"
    )
    mode, why = choose("auto", needed, "cuda", device_free=7.5 * GB, ram_available=100 * GB)  # an 8 GB card
    assert mode == "host" and "more than 50% of the 7.50 GB free on the device" in why
    assert "fits in 50% of the 100.00 GB of available RAM" in why
    mode, why = choose("auto", needed, "cuda", device_free=7.5 * GB, ram_available=100 * GB, ranks=4)
    assert mode == "none" and "does not fit in 50% of the 100.00 GB of available RAM, for 4 ranks" in why
    assert choose("auto", 1.4 * GB, "cuda", device_free=7.5 * GB, ram_available=8 * GB)[0] == "device"  # COVID
    # the stated fractions are the boundaries
    assert choose("auto", int(DEVICE_FRACTION * 8 * GB), "cuda", 8 * GB, 0)[0] == "device"
    assert choose("auto", int(DEVICE_FRACTION * 8 * GB) + 1, "cuda", 8 * GB, 10**12)[0] == "host"
    assert choose("auto", int(HOST_FRACTION * 8 * GB), "cpu", None, 8 * GB)[0] == "host"
    mode, why = choose("auto", int(HOST_FRACTION * 8 * GB) + 1, "cpu", None, 8 * GB)
    assert mode == "none" and "on the CPU, host and device are one" in why
    assert choose("device", 3 * GB, "cpu", None, 4 * GB)[0] == "device"  # host memory on the CPU: all of it may go
    assert choose("none", 10**15, "cuda", None, 0)[0] == "none"


def test_an_explicit_cache_that_cannot_fit_is_one_line_and_bad_names_are_refused(mixed_sizes):
    with pytest.raises(InputError, match=r"^cache device: the decoded images take 9\.00 GB, more than the 8\.00 GB"):
        choose("device", 9 * GB, "cuda", device_free=8 * GB, ram_available=100 * GB)
    with pytest.raises(InputError, match=r"^cache host: .* 9\.00 GB x 2 ranks, more than the 16\.00 GB"):
        choose("host", 9 * GB, "cuda", device_free=8 * GB, ram_available=16 * GB, ranks=2)
    with pytest.raises(ValueError, match="cache 'gpu' is not one of none, host, device, auto"):
        build_loader(str(mixed_sizes), cache="gpu")
    with pytest.raises(ValueError, match="cache 'host' is a native-backend option; backend 'dali' takes none or auto"):
        build_loader(str(mixed_sizes), backend="dali", cache="host")


def test_a_damaged_image_stops_the_fill_with_its_shard_and_row(mixed_sizes, tmp_path):
    """The fill decodes the whole split before the first batch, so the error comes at once, whichever batch holds
    the image."""
    import shutil

    root = tmp_path / "damaged"
    shutil.copytree(mixed_sizes, root)
    data = PackedDataset(root)
    row = int(data.indices("train")[-1])
    offset, shard = int(data.index[row]["offset"]), root / data.shard_names[int(data.index[row]["shard"])]
    raw = bytearray(shard.read_bytes())
    raw[offset + 8 : offset + 300] = bytes(292)  # the signature stays: the decoder meets it
    shard.write_bytes(bytes(raw))
    loader = build_loader(str(root), LoaderSettings(batch_size=7, size=16, workers=1), cache="host")
    with pytest.raises(InputError, match=rf"damaged/train-00003\.tar: row {row}: jpeg member does not decode"):
        next(iter(loader))


def test_an_image_whose_size_is_not_the_index_one_is_named(tmp_path):
    out = tmp_path / "lying"
    writer = PackWriter(out, "lying", "multiclass", ["a"], "png", 16, shard_samples=8)
    for k in range(5):
        image = np.full((16, 20), 10 * k, np.uint8)
        writer.add("train", encode_image(image, "png"), 16, 20 if k != 3 else 18, {"label": 0})  # row 3's is wrong
    writer.finish({"skipped": []})
    loader = build_loader(str(out), LoaderSettings(batch_size=2, size=8, workers=1), cache="host")
    with pytest.raises(InputError, match=r"train-00000\.tar: row 3 decodes to 16 x 20 pixels, index\.npy says 16 x 18"):
        next(iter(loader))


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch.device("cuda")


def _gather_without_waiting(cache, rows) -> torch.Tensor:
    """cache.gather under torch's sync debug mode: anything that would make the loader's thread wait for the GPU
    raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, _ = cache.gather(rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return images


@pytest.mark.gpu
def test_cuda_device_cache_lives_on_the_gpu_and_gives_the_same_views(mixed_sizes):
    device = _cuda()
    loader = build_loader(
        str(mixed_sizes), LoaderSettings(batch_size=7, device=device, size=16, seed=3), cache="device"
    )
    assert loader.gpu_jpeg and loader.cache_mode == "device"
    batch = next(iter(loader))
    assert loader.cache.pixels.is_cuda and batch.views[0].is_cuda
    rows = loader.rows[[4, 0, 9]]
    images = _gather_without_waiting(loader.cache, rows)
    expected = [torch.from_numpy(loader.data.image(int(r))) for r in rows]  # cv2 on the CPU
    h, w = max(e.shape[0] for e in expected), max(e.shape[1] for e in expected)
    assert images.is_cuda and images.shape == (3, 1, h, w)
    for image, cpu in zip(images.cpu(), expected):  # nvJPEG's IDCT may round some pixels unlike libjpeg's
        error = (image[0, : cpu.shape[0], : cpu.shape[1]].float() - cpu.float()).abs()
        assert error.mean() < 1 and error.max() <= 8  # another row's texture would be tens of levels off
    # nvJPEG fills it: the pixels are the ones the uncached CUDA path decodes, so the views match bit for bit
    assert_same_batches(epochs(mixed_sizes, "none", device=device), epochs(mixed_sizes, "device", device=device))
    resumed = epochs(mixed_sizes, "device", device=device, start_step=2)
    assert_same_batches(epochs(mixed_sizes, "none", device=device)[2:], resumed)


@pytest.mark.gpu
def test_cuda_host_cache_stays_in_ram_and_gives_the_same_views(mixed_sizes):
    device = _cuda()
    loader = build_loader(str(mixed_sizes), LoaderSettings(batch_size=7, device=device, size=16, seed=3), cache="host")
    next(iter(loader))
    assert loader.cache.pixels.device.type == "cpu" and loader.cache.full
    images = _gather_without_waiting(loader.cache, loader.rows[:5])
    assert images.is_cuda
    assert_same_batches(epochs(mixed_sizes, "none", device=device), epochs(mixed_sizes, "host", device=device))


@pytest.mark.gpu
def test_cuda_auto_puts_a_small_split_on_the_device(mixed_sizes):
    device = _cuda()
    loader = build_loader(str(mixed_sizes), LoaderSettings(batch_size=7, device=device, size=16), cache="auto")
    assert loader.cache_mode == "device"
    assert "cache auto -> device: the decoded images take" in loader.cache_note


def test_finetune_with_the_default_cache_trains_exactly_as_without(covid_packed, tmp_path, capsys):
    """`--cache` defaults to auto, which is host on the CPU: the same views give the same losses and scores."""
    import json

    from tests.test_finetune import SMALL, finetune

    runs = {}
    for cache in ("none", None):
        out = tmp_path / str(cache)
        args = ["--data", covid_packed, "--init", "random", "--out", out, *SMALL, "--epochs", "1"]
        result = finetune(capsys, *args, *(["--cache", cache] if cache else []))
        assert result.returncode == 0, result.stderr[-2000:]
        runs[cache] = json.loads((out / "results.json").read_text()), result.stdout
    (plain, plain_out), (cached, cached_out) = runs["none"], runs[None]
    assert "cache" not in plain_out
    assert "train: cache auto -> host" in cached_out and "val: cache auto -> host" in cached_out
    assert cached["config"]["cache"] == "auto"
    assert [h["train_loss"] for h in plain["history"]] == [h["train_loss"] for h in cached["history"]]
    assert plain["val"] == cached["val"] and plain["test"] == cached["test"]


def test_pretrain_takes_a_cache_field_and_refuses_a_bad_one():
    from twinray.train.config import ConfigError, PretrainConfig, from_args

    assert PretrainConfig().cache == "auto"
    assert from_args(["--cache", "device"])[0].cache == "device"
    with pytest.raises(ConfigError, match="cache 'gpu' is not one of: none, host, device, auto"):
        from_args(["--cache", "gpu"])
