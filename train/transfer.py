"""Where a downstream model's backbone comes from (`--init`) and which of its parts train (`--mode`).

--init   a pretraining run directory (its exported backbone.safetensors), a backbone .safetensors file,
         `imagenet` (timm's weights; the RGB stem is summed into one channel), or `random`.
--mode   `full` trains everything; `linear` only the head; `freeze:K` freezes the stem and the first K residual stages
         (K = 0..4, the study's figure 15), so freeze:4 leaves only the head to train.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from twinray.train.model import build_backbone

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class TransferError(ValueError):
    """A bad --init or --mode: the message is the one line the user sees."""


def _backbone_file(init: Path) -> Path:
    if init.is_dir():
        path = init / "backbone.safetensors"
        if not path.is_file():
            raise TransferError(
                f"--init {init}: this directory has no backbone.safetensors (a pretraining run exports it when it "
                "finishes; pass the run directory or the .safetensors file)"
            )
        return path
    if init.suffix != ".safetensors":
        raise TransferError(f"--init {init}: not a run directory or a .safetensors backbone, nor imagenet or random")
    return init


def load_backbone(init: str, name: str = "resnet18", in_chans: int = 1) -> tuple[nn.Module, dict]:
    """The backbone and what it is: {"init", "timm_name", "in_chans"}. A file's own name and channels win over
    `name` and `in_chans`, which serve `imagenet` and `random`."""
    if init == "random":
        return build_backbone(name, in_chans), {"init": "random", "timm_name": name, "in_chans": in_chans}
    if init == "imagenet":
        try:  # timm sums the RGB stem weights into one input channel when in_chans=1
            model = build_backbone(name, in_chans, pretrained=True)
        except Exception as e:  # no network and no cache: hub, HTTP and file errors all land here
            raise TransferError(
                f"--init imagenet: timm's {name} weights could not be fetched or found in the local cache "
                f"({type(e).__name__})"
            ) from None
        return model, {"init": "imagenet", "timm_name": name, "in_chans": in_chans}
    path = Path(init)
    if not path.exists():
        raise TransferError(f"--init {init}: no such file or directory (nor imagenet or random)")
    path = _backbone_file(path)
    info_file = path.with_suffix(".json")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        name = info.get("timm_name", meta.get("timm_name", name))
        in_chans = int(info.get("in_chans", meta.get("in_chans", in_chans)))
        model = build_backbone(name, in_chans)
        model.load_state_dict(load_file(path))
    except TransferError:
        raise
    except Exception as e:
        raise TransferError(f"--init {path}: not a twinray backbone ({type(e).__name__}: {str(e)[:120]})") from None
    return model, {"init": str(path), "timm_name": name, "in_chans": in_chans}


def parse_mode(mode: str) -> tuple[str, int]:
    """`full` -> ("full", 0), `linear` -> ("linear", 0), `freeze:K` -> ("freeze", K)."""
    if mode in ("full", "linear"):
        return mode, 0
    if mode.startswith("freeze:"):
        k = mode.split(":", 1)[1]
        if k.isdigit() and 0 <= int(k) <= len(RESNET_STAGES):
            return "freeze", int(k)
        raise TransferError(f"--mode {mode}: K must be an integer from 0 to {len(RESNET_STAGES)}")
    raise TransferError(f"--mode {mode!r} is not one of full, linear, freeze:K (K = 0..4)")


def frozen_modules(backbone: nn.Module, mode: str) -> list[nn.Module]:
    """The backbone's parts that `mode` freezes."""
    kind, k = parse_mode(mode)
    if kind == "full":
        return []
    if kind == "linear":
        return [backbone]
    if not all(hasattr(backbone, s) for s in RESNET_STAGES):
        raise TransferError(f"--mode {mode}: freezing by stage needs a ResNet (stem, layer1..layer4)")
    return [backbone.conv1, backbone.bn1, *(getattr(backbone, s) for s in RESNET_STAGES[:k])]


def freeze(backbone: nn.Module, mode: str) -> list[nn.Module]:
    """Stops gradients through the frozen parts and returns them; call `keep_frozen_in_eval` after each .train()."""
    parts = frozen_modules(backbone, mode)
    for part in parts:
        part.requires_grad_(False)
    return parts


def keep_frozen_in_eval(parts: list[nn.Module]) -> None:
    """Frozen BatchNorms keep their running statistics: a frozen part is a fixed function."""
    for part in parts:
        part.eval()


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]
