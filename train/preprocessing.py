"""What made the pixels a model sees, recorded with the model and checked against a dataset (docs/reuse.md).

A model fed differently preprocessed images fails quietly (mlmed/torchxrayvision#121), so every exported backbone
(backbone.json), fine-tuned model (model.json) and export (timm's config.json, ONNX's model.json) carries a
`preprocessing` block:

    input          the tensor the model takes: float32 N x C x S x S, grey in [0, 1] (uint8 / 255), one channel
                   (repeated for a 3-channel stem), a centre square resized to S with bicubic interpolation: what the
                   evaluation recipe (pipelines/augment/recipes.py EVAL_RECIPE) feeds kNN, finetune and embed
    normalization  {"mean", "std"} per channel, subtracted and divided after the range: (0, 1), none, as in the study
    prep           the packed manifest's `prep` settings that turned raw files into 8-bit grey: `size` (the shorter
                   side), `bit_depth` (the 16-bit policy), `encoding`, `max_pixels`, plus the fixed DICOM policy
"""

from __future__ import annotations

import sys

from twinray.pipelines.augment import EVAL_RECIPE

# prep/dicom.py's policy; prep has no flag for it, so it is a constant of this twinray (docs/format.md, "DICOM").
DICOM_POLICY = "PS3.3 C.11 grayscale display pipeline: Modality LUT, VOI LUT, presentation; 8 bits from the last range"
# The prep settings that change the pixels a model sees; the others (src, seed, split, shard_samples) do not.
PREP_KEYS = ("size", "bit_depth", "encoding", "max_pixels", "dicom")


def prep_settings(manifest: dict) -> dict:
    """The pixel-shaping settings of a packed dataset's manifest (`prep` block, docs/format.md), with the DICOM
    policy added; a setting the manifest does not record is None (a dataset written by PackWriter alone)."""
    prep = manifest.get("prep") or {}
    found = {key: prep.get(key) for key in PREP_KEYS if key != "dicom"}
    found["encoding"] = found["encoding"] or manifest.get("image", {}).get("encoding")
    found["dicom"] = DICOM_POLICY
    return found


def record(manifest: dict, size: int, in_chans: int) -> dict:
    """The `preprocessing` block for a model trained at `size` px with `in_chans` input channels on the dataset
    whose manifest is `manifest` (see the module docstring)."""
    mean, std = EVAL_RECIPE.normalize or (0.0, 1.0)
    return {
        "input": {
            "shape": ["N", in_chans, size, size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "scale": "uint8 / 255",
            "channels": "grey" if in_chans == 1 else f"grey repeated {in_chans} times",
            "crop": "centre square (the whole image when square)",
            "interpolation": EVAL_RECIPE.interpolation,
        },
        "normalization": {"mean": [mean] * in_chans, "std": [std] * in_chans},
        "prep": prep_settings(manifest),
    }


def differences(model: dict | None, manifest: dict) -> list[str]:
    """'NAME model VALUE, data VALUE' for each pixel-shaping prep setting where a model's `preprocessing` block
    and a dataset's manifest differ. A model without the block (exported before it existed) gives no line."""
    if not model or "prep" not in model:
        return []
    ours, theirs = model["prep"], prep_settings(manifest)
    return [f"{k} model {ours.get(k)!r}, data {theirs.get(k)!r}" for k in PREP_KEYS if ours.get(k) != theirs.get(k)]


def warn(prog: str, model: dict | None, manifest: dict, data: str) -> str | None:
    """Writes one line to stderr when the data's prep settings differ from the model's, and returns it (or None).
    A warning, not an error: the settings may differ on purpose; the features then answer to other pixels."""
    said = differences(model, manifest)
    if not said:
        return None
    line = f"{prog}: warning: {data} was prepared otherwise than the model's data: {'; '.join(said)}"
    sys.stderr.write(line + "\n")
    return line


def of_init(init: dict) -> dict | None:
    """The `preprocessing` block of a model train/transfer.py's `load_backbone` loaded from a file (its dict's
    "init" is the .safetensors path; the block is in the JSON beside it: backbone.json, model.json), or None for
    `imagenet`, `random` and a model recorded before the block existed."""
    import json
    from pathlib import Path

    path = Path(init.get("init", "")).with_suffix(".json")
    if init.get("init") in (None, "imagenet", "random") or not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("preprocessing")
    except (ValueError, AttributeError):
        return None
