"""Resuming a run in --out: what pretraining (train/pretrain.py) and fine-tuning (train/finetune.py) share.

A re-run on an --out goes through the same steps in both tools:

1. a finished run there with the same settings is left as it is (one line), one with other settings is refused;
2. `--force` discards what the tool writes there, its checkpoints included, and the run starts over;
3. otherwise the newest checkpoint is read (`latest_checkpoint`, here) and its settings compared with this run's, before
   anything in --out changes: other settings are refused in one line naming each;
4. the checkpoint's state is put back, and a line says where the run goes on from.

What differs stays with each tool, written out there:

- finished: pretrain, a checkpoint at --epochs (or --max-steps) beside backbone.safetensors (`_train`), and a
  backbone without a checkpoint is refused (`plan`); finetune, results.json (`finished`).
- compared: pretrain, train/state.py `resume_changes` (lr and a larger --epochs may change, --allow-change names
  more; ConfigError); finetune, RESUME_MUST_MATCH, every one fixed (`differences`; InputError).
- --force removes: pretrain, `discard` (the checkpoints, half-written ones too, and OUTPUTS, in name order, by the
  main process); finetune, OUTPUTS with results.json first, then the checkpoints.
- the state: pretrain, the whole `RunState`, mid-epoch included (`resume`); finetune, the model, optimizer,
  history and best epoch after the last finished epoch (`_resume`).
"""

from __future__ import annotations

from pathlib import Path

from twinray.train import checkpoint


def latest_checkpoint(out: str | Path, force: bool = False) -> dict | None:
    """The checkpoint a re-run on `out` goes on from: the newest complete one (train/checkpoint.py `latest`), as
    the state `checkpoint.save` stored, plus "name": its folder's name ("ckpt-000000120"). None under `force` (the
    run starts over, so `out` is not read) or when `out` holds none. Raises ValueError naming a damaged checkpoint
    (checkpoint.load)."""
    path = None if force else checkpoint.latest(out)
    if path is None:
        return None
    return {**checkpoint.load(path), "name": path.name}
