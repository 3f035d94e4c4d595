"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A nested state (state dicts of the model, optimizer, scheduler, RNG, ...) is flattened: each tensor goes to
`tensors.safetensors` under its path ("optimizer/state/3/exp_avg"), and the rest of the structure goes to
`state.json` with {"__tensor__": path} where a tensor was. A checkpoint is a directory `ckpt-{step:09d}`, built
under a temporary name and renamed into place, so a run killed while saving leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from twinray.atomic import atomic, naming

PREFIX = "ckpt-"


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """A module's state dict as one safetensors file, written atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def _flatten(obj, path: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        # JSON keys are strings: remember int keys (optimizer state is keyed by parameter index)
        return {"__dict__": [[k, _flatten(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {
            "__list__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)],
            "tuple": isinstance(obj, tuple),
        }
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _unflatten(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            items = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(items) if obj["tuple"] else items
    return obj


def save(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:09d}"
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(state, "", tensors)
    try:  # a full disk names the checkpoint (twinray.atomic.naming) and leaves no half-written folder
        with naming(final):
            # safetensors refuses tensors that share memory; the copies are cheap next to a training step
            save_file({k: v.clone() for k, v in tensors.items()}, tmp / "tensors.safetensors")
            (tmp / "state.json").write_text(json.dumps(structure))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(run_dir.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | Path) -> Path | None:
    found = sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if (p / "state.json").is_file())
    return found[-1] if found else None


def load(path: str | Path) -> dict:
    """The state `save` stored; a damaged checkpoint (a bad copy, a full disk) is a ValueError naming it."""
    path = Path(path)
    try:
        tensors = load_file(path / "tensors.safetensors")
        return _unflatten(json.loads((path / "state.json").read_text()), tensors)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # missing, cut short, or mangled
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: unreadable checkpoint ({why}); delete it to resume from the one before") from None
