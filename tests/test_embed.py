"""`twinray embed` (train/embed.py) and `twinray neighbours` (train/neighbours.py) on a real finished pretraining
run (issue 22, section 2; docs/reuse.md)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.test_export import backbone_of, finished_run
from twinray import command
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE
from twinray.prep.format import SPLITS, PackedDataset, PackWriter
from twinray.train.embed import main as embed_main
from twinray.train.export import main as export_main
from twinray.train.neighbours import main as neighbours_main


@pytest.fixture(scope="module")
def run(covid_packed, tmp_path_factory) -> Path:
    return finished_run(tmp_path_factory.mktemp("embed") / "run", covid_packed)


def read_rows(emb: Path) -> list[dict]:
    with open(emb / "rows.csv", newline="") as f:
        return list(csv.DictReader(f))


def embed(model, data, out, *extra) -> Path:
    assert embed_main(["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
                       "--batch-size", "16", "--workers", "1", *extra]) == 0  # fmt: skip
    return out


def test_embed_writes_one_row_per_image_with_labels_metadata_and_a_map(run, covid_packed, tmp_path):
    emb = embed(run, covid_packed, tmp_path / "emb", "--color-by", "source")
    data = PackedDataset(covid_packed)
    x, rows = np.load(emb / "embeddings.npy"), read_rows(emb)
    assert x.dtype == np.float32 and x.shape == (len(data), 512) == (len(rows), 512)
    assert sorted(int(r["row"]) for r in rows) == list(range(len(data)))  # every image once
    for r in rows:
        meta, k = data.metadata(int(r["row"])), int(r["row"])
        assert r["label"] == data.classes[int(data.labels()[k])] == meta["class"]
        assert r["split"] == SPLITS[data.index["split"][k]] == meta["split"]
        assert r["path"] == meta["source"] and r["origin"] == meta["origin"]
    # the features are the backbone's, row by row
    test_rows = data.indices("test")
    settings = LoaderSettings(split="test", batch_size=64, recipe=EVAL_RECIPE, size=32, views=1, drop_last=False)
    with build_loader(str(covid_packed), settings) as loader, torch.no_grad():
        batch = next(iter(loader))
        want = backbone_of(run)(batch.views[0]).numpy()
    at = {int(r["row"]): k for k, r in enumerate(rows)}
    got = x[[at[int(i)] for i in batch.indices]]
    assert len(got) == len(test_rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    info = json.loads((emb / "embed.json").read_text())
    assert info["n"] == len(data) and info["data_digest"] == data.digest and info["color_by"] == "origin"
    assert info["map"].startswith("PCA") and info["preprocessing"]["prep"]["size"] == 256
    with Image.open(emb / "map.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_embed_reads_a_timm_export_and_gives_the_same_embeddings(run, covid_packed, tmp_path):
    assert export_main([str(run), "--out", str(tmp_path / "timm")]) == 0
    a = embed(run, covid_packed, tmp_path / "a", "--splits", "val")
    b = embed(tmp_path / "timm", covid_packed, tmp_path / "b", "--splits", "val")
    assert read_rows(a) == read_rows(b) and len(read_rows(a)) == len(PackedDataset(covid_packed).indices("val"))
    np.testing.assert_array_equal(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"))


def test_a_model_of_another_channel_count_is_one_line_exit_2(covid_packed, tmp_path, capsys):
    folder = tmp_path / "rgba"  # a real timm Hub folder, written by timm itself, of a 4-channel model
    timm.models.save_for_hf(timm.create_model("resnet18", num_classes=0, in_chans=4), str(folder),
                            safe_serialization=True)  # fmt: skip
    argv = ["embed", "--model", str(folder), "--data", str(covid_packed), "--out", str(tmp_path / "e")]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"embed: error: --model {folder}: the model takes 4 input channels") and err.count("\n") == 1
    assert not (tmp_path / "e").exists()


def test_embed_warns_in_one_line_when_the_data_was_prepared_otherwise(run, covid_packed, tmp_path, capsys):
    data = tmp_path / "other"
    shutil.copytree(covid_packed, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["prep"]["size"] = 512
    (data / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    embed(run, data, tmp_path / "emb", "--splits", "test")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"embed: warning: {data} was prepared otherwise than the model's data: size model 256, "
                        "data 512"]  # fmt: skip


def test_an_existing_embedding_is_kept_without_force(run, covid_packed, tmp_path, capsys):
    emb = embed(run, covid_packed, tmp_path / "emb", "--splits", "val")
    before = (emb / "embeddings.npy").read_bytes()
    argv = ["embed", "--model", str(run), "--data", str(covid_packed), "--out", str(emb), "--splits", "test"]
    assert command.main(argv) == 2
    assert "exists; pass --force" in capsys.readouterr().err and (emb / "embeddings.npy").read_bytes() == before
    assert command.main([*argv, "--force", "--device", "cpu"]) == 0
    assert {r["split"] for r in read_rows(emb)} == {"test"}


def test_umap_without_umap_learn_is_one_line(run, covid_packed, tmp_path, capsys):
    argv = ["embed", "--model", str(run), "--data", str(covid_packed), "--out", str(tmp_path / "u"), "--map", "umap",
            "--splits", "val", "--device", "cpu"]  # fmt: skip
    if importlib.util.find_spec("umap") is not None:  # umap-learn is optional (no extra installs it)
        assert command.main(argv) == 0 and json.loads((tmp_path / "u" / "embed.json").read_text())["map"] == "UMAP"
        return
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert "--map umap needs umap-learn" in err and err.count("\n") == 1 and not (tmp_path / "u").exists()


@pytest.fixture(scope="module")
def planted(covid_packed, tmp_path_factory) -> tuple[Path, int, int]:
    """covid_packed's train and val images re-packed, and a test split of one image: a copy of train image 3's
    bytes. Returns (data, the original's row, the copy's row). The generated phantoms are alike at 32 px, and a
    one-epoch backbone tells them apart only a little, but the copy is the one cross-split pair above 0.99 (the
    next scores about 0.97); with the test split's other phantoms, pairs of 0.9999 occur."""
    src = PackedDataset(covid_packed)
    out = tmp_path_factory.mktemp("planted") / "data"
    writer = PackWriter(out, "planted", "multiclass", src.classes, src.encoding, 256, shard_samples=16)
    train, val = src.indices("train"), src.indices("val")
    for split, k in [*(("train", k) for k in train), *(("val", k) for k in val), ("test", train[3])]:
        meta = {key: v for key, v in src.metadata(int(k)).items() if key != "split"}
        if split == "test":
            meta["source"] = "copy/of/it.png"
        writer.add(split, bytes(src.image_bytes(int(k))), int(src.index["height"][k]), int(src.index["width"][k]), meta)
    writer.finish({"skipped": [], "prep": src.manifest["prep"]})
    return out, 3, len(train) + len(val)


def test_neighbours_finds_a_planted_duplicate_across_splits(run, planted, tmp_path, capsys):
    data, original, copy = planted
    emb = embed(run, data, tmp_path / "emb")
    assert PackedDataset(data).metadata(copy)["source"] == "copy/of/it.png"
    capsys.readouterr()
    assert neighbours_main(["--emb", str(emb), "--query", "copy/of/it.png", "-k", "4", "--threshold", "0.999"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"query: row {copy} (test, ")
    first = out[1].split()
    assert first[0] == "1" and float(first[1]) >= 0.999 and first[3] == str(original) and first[4] == "train"
    assert len([line for line in out if line.startswith("  ")]) == 4  # k neighbours
    assert out[-1].startswith("leak check: 1 cross-split pairs at cosine >= 0.999 (test-train 1)"), out[-1]
    leaks = read_rows_of(emb / "leaks.csv")
    assert [(r["row_a"], r["row_b"], r["split_a"], r["split_b"]) for r in leaks] == [
        (str(original), str(copy), "train", "test")
    ]
    with Image.open(emb / f"neighbours-{copy}.png") as png:
        assert png.format == "PNG"
    # by row, and the leak check alone
    assert neighbours_main(["--emb", str(emb), "--query", str(original), "-k", "1", "--threshold", "0.999"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[3] == str(copy)
    assert neighbours_main(["--emb", str(emb), "--threshold", "0.999"]) == 0
    assert capsys.readouterr().out.startswith("leak check: 1 cross-split pairs")


def test_neighbours_bad_query_is_one_line(run, covid_packed, tmp_path, capsys):
    emb = embed(run, covid_packed, tmp_path / "emb", "--splits", "val")
    capsys.readouterr()
    assert command.main(["neighbours", "--emb", str(emb), "--query", "no/such.png"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neighbours: error: --query no/such.png: no image") and err.count("\n") == 1
    assert command.main(["neighbours", "--emb", str(tmp_path)]) == 2
    assert "no embeddings.npy" in capsys.readouterr().err

    # --grid in a folder not made yet, or a folder as --grid, and an embeddings.npy cut short: were tracebacks
    grid = tmp_path / "grids" / "new" / "q.png"
    first = read_rows(emb)[0]["row"]
    assert neighbours_main(["--emb", str(emb), "--query", first, "-k", "1", "--grid", str(grid)]) == 0
    with Image.open(grid) as png:
        assert png.format == "PNG"
    capsys.readouterr()
    assert command.main(["neighbours", "--emb", str(emb), "--query", first, "--grid", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"neighbours: error: --grid {tmp_path} is a folder; the grid is one PNG file: give its path\n"
    cut = tmp_path / "cut"
    shutil.copytree(emb, cut)
    (cut / "embeddings.npy").write_bytes((emb / "embeddings.npy").read_bytes()[:100])
    assert command.main(["neighbours", "--emb", str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neighbours: error: --emb {cut}: embeddings.npy does not read (") and err.count("\n") == 1

    # the image's path as the user's raw folder has it (a longer path ending with the source) finds it
    row = read_rows(emb)[0]
    raw = f"/home/me/data/raw/COVID-19_Radiography_Dataset/{row['path']}"
    assert neighbours_main(["--emb", str(emb), "--query", raw, "-k", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"query: row {row['row']} (val, {row['label']}) {row['path']}\n")


def read_rows_of(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_unknown_color_by_is_one_line_before_anything_runs(run, covid_packed, tmp_path, capsys):
    out = tmp_path / "e"
    argv = ["embed", "--model", str(run), "--data", str(covid_packed), "--out", str(out), "--color-by", "sex"]
    assert command.main(argv) == 2
    err = capsys.readouterr().err
    assert err == "embed: error: --color-by 'sex': not a column here; there are row, path, split, label, origin\n"
    assert not (tmp_path / "e").exists()


def test_bad_settings_are_one_line_naming_the_flag_and_force_never_replaces_the_data(run, covid_packed, tmp_path,
                                                                                     capsys):  # fmt: skip
    base = ["embed", "--model", str(run), "--data", str(covid_packed), "--out", str(tmp_path / "e")]
    # --size 7 and --batch-size 0 were a build_loader ValueError taken for an empty split: "no images in ..."
    for extra, said in ((["--size", "7"], "argument --size: '7' must be at least 8"),
                        (["--batch-size", "0"], "argument --batch-size: '0' must be at least 1"),
                        (["--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
                        (["--workers", "0"], "argument --workers: '0' must be at least 1")):  # fmt: skip
        assert command.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1 and "no images" not in err, err
        assert not (tmp_path / "e").exists()
    if not torch.cuda.is_available():  # was a traceback from torch's CUDA init
        assert command.main([*base, "--device", "cuda"]) == 2
        assert "'cuda': no CUDA device here; use --device cpu" in capsys.readouterr().err

    # --out DATA --force (or a folder holding the data, or the run) replaced what embed reads with its output
    data = tmp_path / "data" / "covid"
    shutil.copytree(covid_packed, data)
    for out in (data, data.parent):
        argv = ["embed", "--model", str(run), "--data", str(data), "--out", str(out), "--force", "--device", "cpu"]
        assert command.main(argv) == 2
        err = capsys.readouterr().err
        assert "which this command reads; give another --out" in err and err.count("\n") == 1, err
    assert PackedDataset(data).manifest["splits"] and (run / "backbone.safetensors").is_file()
    # a split named twice was embedded twice: each image listed two times, its own nearest neighbour
    emb = embed(run, data, tmp_path / "twice", "--splits", "test, test")
    assert len(read_rows(emb)) == len(PackedDataset(data).indices("test")) == len(np.load(emb / "embeddings.npy"))
    assert command.main([*base[:4], str(data), "--out", "/", "--force"]) == 2
    assert "--out /: give a folder of its own" in capsys.readouterr().err


def test_a_plain_folder_is_packed_into_the_embedding_and_neighbours_reads_it(run, tmp_path, capsys):
    rng = np.random.default_rng(4)
    folder = tmp_path / "xrays" / "ward" / "2026"
    folder.mkdir(parents=True)
    for i in range(12):  # a nested tree of PNGs without labels
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    emb = embed(run, tmp_path / "xrays", tmp_path / "emb")
    out = capsys.readouterr().out
    assert "packed 12 images" in out and "1 skipped" in out  # prep images' own summary line
    packed = PackedDataset(emb / "packed")
    assert packed.task == "none" and len(packed) == 12
    rows = read_rows(emb)
    assert sorted(r["path"] for r in rows) == [f"ward/2026/im{i:02d}.png" for i in range(12)]
    assert {r["label"] for r in rows} == {""} and np.load(emb / "embeddings.npy").shape == (12, 512)
    assert json.loads((emb / "embed.json").read_text())["data"] == str(tmp_path / "emb" / "packed")
    assert neighbours_main(["--emb", str(emb), "--query", "0", "-k", "3"]) == 0  # the images drawn from EMB/packed
    assert "ward/2026/" in capsys.readouterr().out
