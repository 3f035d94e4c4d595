"""Where a downstream model's backbone comes from (`--init`) and which of its parts train (`--mode`).

--init   a pretraining run directory (its exported backbone.safetensors), a backbone .safetensors file (twinray's,
         or a timm checkpoint: its classifier left out, an RGB stem summed into one channel),
         a fine-tuned model (a train/finetune.py run directory or its model.safetensors: its backbone, and its head
         matched to the data's classes by name, `classifier_head`), `imagenet` (timm's weights; the RGB stem is
         summed into one channel), or `random`.
--mode   `full` trains everything; `linear` only the head; `freeze:K` freezes the stem and the first K residual stages
         (K = 0..4, the study's figure 15), so freeze:4 leaves only the head to train.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import timm
import torch
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import load_file
from timm.models import adapt_input_conv
from torch import nn

from twinray.train.model import build_backbone

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


class TransferError(ValueError):
    """A bad --init or --mode: the message is the one line the user sees."""


def _backbone_file(init: Path) -> Path:
    if init.is_dir():
        path = init / "backbone.safetensors"
        if not path.is_file() and (init / "model.safetensors").is_file():
            return init / "model.safetensors"  # a fine-tuned model
        if not path.is_file():
            raise TransferError(
                f"--init {init}: this directory has no backbone.safetensors (a pretraining run exports it when it "
                "finishes) nor model.safetensors (a fine-tuning run's); pass the run directory or the .safetensors "
                "file"
            )
        return path
    if init.suffix != ".safetensors":
        raise TransferError(f"--init {init}: not a run directory or a .safetensors backbone, nor imagenet or random")
    return init


def imagenet_missing(name: str, error: BaseException) -> str:
    """The line for `--init imagenet` when timm's weights are not here: the Hub repository they come from, the
    cache folder that was looked in (huggingface_hub's HF_HUB_CACHE, as set now), and the file to pass instead."""
    repo = timm.create_model(name, pretrained=False).pretrained_cfg.get("hf_hub_id") or f"timm/{name}"
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    why = "HF_HUB_OFFLINE is set" if offline else f"the download failed: {type(error).__name__}"
    return (
        f"--init imagenet: timm's {name} weights ({repo} on the Hugging Face Hub) are not in the local cache "
        f"{os.environ.get('HF_HUB_CACHE') or constants.HF_HUB_CACHE} ({why}); run once with network to fill it, "
        f"or download model.safetensors from https://huggingface.co/{repo} and pass --init PATH/model.safetensors"
    )


def load_backbone(
    init: str, name: str = "resnet18", in_chans: int = 1, output_stride: int = 32
) -> tuple[nn.Module, dict]:
    """The backbone and what it is: {"init", "timm_name", "in_chans", "output_stride"}, plus the model's "classes"
    and "task" for a fine-tuned model (its model.json). A file's own name, channels and output stride (train/model.py
    OUTPUT_STRIDES; 32 where a file does not record one) win over `name`, `in_chans` and `output_stride`, which
    serve `imagenet` and `random`. Raises TransferError in one line naming the bad --init."""
    if init == "random":
        found = {"init": "random", "timm_name": name, "in_chans": in_chans, "output_stride": output_stride}
        return build_backbone(name, in_chans, output_stride=output_stride), found
    if init == "imagenet":
        try:  # timm sums the RGB stem weights into one input channel when in_chans=1
            model = build_backbone(name, in_chans, pretrained=True, output_stride=output_stride)
        except Exception as e:  # no network and no cache: hub, HTTP and file errors all land here
            raise TransferError(imagenet_missing(name, e)) from None
        return model, {"init": "imagenet", "timm_name": name, "in_chans": in_chans, "output_stride": output_stride}
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
        output_stride = int(info.get("output_stride", meta.get("output_stride", 32)))
        model = build_backbone(name, in_chans, output_stride=output_stride)
        tensors = load_file(path)
        classifier = any(k.startswith("head.") for k in tensors)  # a fine-tuned model: backbone.* and head.*
        if classifier:
            tensors = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        else:
            tensors = timm_weights(model, tensors)
        model.load_state_dict(tensors)
        if classifier and not isinstance(info.get("classes"), list):
            raise TransferError(f"--init {path}: a fine-tuned model without its classes ({info_file} has none)")
    except TransferError:
        raise
    except Exception as e:
        raise TransferError(f"--init {path}: not a twinray backbone ({type(e).__name__}: {str(e)[:120]})") from None
    found = {"init": str(path), "timm_name": name, "in_chans": in_chans, "output_stride": output_stride}
    if classifier:
        found.update(classes=list(info["classes"]), task=info.get("task", "multiclass"))
    return model, found


def timm_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm checkpoint's tensors (a Hub model.safetensors, `twinray export`'s folder) for `model`, a timm model
    without classifier: the classifier's tensors (pretrained_cfg["classifier"], e.g. fc.*) are left out, and an
    RGB stem (pretrained_cfg["first_conv"]) is adapted to the model's channels with timm's adapt_input_conv (for
    one channel: the sum over the three, as timm does for pretrained=True). A twinray backbone passes unchanged."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    heads = (head,) if isinstance(head, str) else tuple(head or ())
    tensors = {k: v for k, v in tensors.items() if not any(k.startswith(h + ".") for h in heads)}
    stems = cfg.get("first_conv")
    for stem in (stems,) if isinstance(stems, str) else tuple(stems or ()):
        key, want = f"{stem}.weight", model.state_dict().get(f"{stem}.weight")
        if key in tensors and want is not None and tensors[key].shape[1] != want.shape[1]:
            tensors[key] = adapt_input_conv(want.shape[1], tensors[key].float()).to(tensors[key].dtype)
    return tensors


def backbone_weights(
    init: str, name: str, in_chans: int, output_stride: int = 32
) -> tuple[dict[str, torch.Tensor], dict]:
    """pretrain --init: the backbone's tensors to start from (load_backbone's sources: a run, a backbone or timm
    .safetensors file, a fine-tuned model's backbone, imagenet), and {"init", "timm_name", "in_chans", "sha256"},
    the sha256 over the tensors (names and bytes, in name order), what a resume compares. Raises TransferError, one
    line, for a bad --init or weights of another architecture or channel count than the run's. The output stride
    is not compared: dilation has no weights, so the same tensors serve every stride (as DeepLab starts an
    output-stride-16 network from ImageNet's), and the run's own `output_stride` builds its backbone."""
    model, info = load_backbone(init, name, in_chans, output_stride)
    if (info["timm_name"], info["in_chans"]) != (name, in_chans):
        raise TransferError(
            f"--init {init}: a {info['timm_name']} backbone with {info['in_chans']} channel(s), and this run trains "
            f"a {name} with {in_chans}; pass --backbone {info['timm_name']} --channels {info['in_chans']}, or other "
            "weights"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return state, {**info, "sha256": digest.hexdigest()}


def class_indices(known: list[str], names: list[str], model: str) -> list[int]:
    """The index among a model's classes `known` of each class in `names`: classes match by name, never by
    position. Raises TransferError naming `model` (how the user gave it), the classes it does not know, and its
    classes."""
    unknown = [n for n in names if n not in known]
    if unknown:
        which = "class" if len(unknown) == 1 else "classes"
        raise TransferError(
            f"{model}: the data's {which} {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
            f"not among the model's classes ({', '.join(known)})"
        )
    return [known.index(n) for n in names]


def classifier_head(init: dict, names: list[str], task: str) -> dict[str, torch.Tensor] | None:
    """The head of a fine-tuned --init (`init` is load_backbone's dict) for data whose classes (or labels) are
    `names`, in that order: output k is the model's output for the class named names[k], so a class keeps its
    weights whatever its position in either list. None when the init is not a fine-tuned model.

    Returns the state dict of Classifier.head. Raises TransferError naming a class the model does not know and the
    model's classes, or a task (multiclass, multilabel) other than the model's."""
    if "classes" not in init:
        return None
    known = init["classes"]
    if init["task"] != task:
        raise TransferError(f"--init {init['init']}: a {init['task']} model, and the data is {task}")
    rows = torch.tensor(class_indices(known, names, f"--init {init['init']}"))
    tensors = load_file(init["init"])
    head = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
    head["1.weight"], head["1.bias"] = head["1.weight"][rows], head["1.bias"][rows]
    return head


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
