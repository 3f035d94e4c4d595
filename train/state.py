"""A pretraining run's state in one object: what a checkpoint holds, and the one place that builds it.

`RunState` gathers the model, its optimizer and lr schedule, the online probe, the fp16 loss scaler, the RNG and
the position in the data (step, epoch, step within the epoch). `state_dict()` is the checkpoint's content
(train/checkpoint.py stores it as safetensors + JSON, no pickle) and `load_state_dict()` puts a run back exactly
where it stopped. `build_run()` makes a fresh state for a config; pretrain and bench/train_speed.py both use it, so
the benchmark trains the very model, optimizer and probe that a run does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from twinray.train.config import PRETRAIN_BY_DIGEST, PRETRAIN_FIXED, PRETRAIN_LEARNED, ConfigError
from twinray.train.methods import build_method, model_pieces
from twinray.train.model import PretrainModel
from twinray.train.momentum import MomentumEncoder
from twinray.train.online_eval import LinearProbe
from twinray.train.optim import build_optimizer, build_scheduler
from twinray.train.step import Method

OLD_DEFAULTS = {"method": "barlow"}  # fields that checkpoints written before them lack
DIGEST_SHOWN = 16  # hex digits of a data digest in a refusal line
DIGEST_NAMES = {digest: name for name, digest in PRETRAIN_BY_DIGEST.items()}  # data_digest -> data, ...


@dataclass
class Position:
    """Where the run is: `step` counts every step taken; `in_epoch` steps of `epoch` are done."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0


@dataclass
class RunState:
    model: nn.Module  # the bare module; compile and DDP wrap it, and it holds the weights
    method: Method  # the forward and loss; holds no tensors (a momentum method keeps its state in `model`)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    probe: LinearProbe | None  # None where no labels reach the run (unlabeled data, no --eval-data)
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scale (Accelerate's), else None
    position: Position = field(default_factory=Position)

    def state_dict(self) -> dict:
        """Tensors and plain values only (no pickle needed): model, optimizer, scheduler, probe and probe_optimizer
        (with a probe), rng (torch's CPU generator, and each CUDA device's), position, and scaler under fp16."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []},
            "position": vars(self.position).copy(),
        }
        if self.probe is not None:
            state["probe"] = self.probe.state_dict()
            state["probe_optimizer"] = self.probe.optimizer.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict, lr: float | None = None, probe: bool = True) -> None:
        """Restores a `state_dict()`. `lr`: this run's base learning rate, which replaces the saved one (a
        re-run may change --lr; the schedule's position is kept). `probe`: False keeps this run's fresh probe
        (a resume onto other --eval-data: the saved probe learned other classes); so does a state without one."""
        self.model.load_state_dict(state["model"])
        if probe and self.probe is not None and "probe" in state:
            self.probe.load_state_dict(state["probe"])
            self.probe.optimizer.load_state_dict(state["probe_optimizer"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if lr is not None:  # the schedule (a LambdaLR: train/optim.py) at its saved step, from the new base lr
            self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
            for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
                group["lr"] = lr * factor(self.scheduler.last_epoch)
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"].get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.position = Position(**state["position"])


def settings(
    cfg, data_digest: str, precision: str, eval_digest: str | None = None, init_digest: str | None = None
) -> dict:
    """What a run learns from (train/config.py PRETRAIN_LEARNED) as a part of the run records it: the data as its
    manifest's digest (`data_digest`), --eval-data as its path and digest (`eval_data_digest`, None without one),
    --init as its path and the sha256 of its weights (`init_digest`, None for random weights), mixed precision as
    resolved (auto: bf16 or no)."""
    values = {name: getattr(cfg, name) for name in PRETRAIN_LEARNED if name != "data"}
    digests = {"data_digest": data_digest, "eval_data_digest": eval_digest, "init_digest": init_digest}
    return {**digests, **values, "mixed_precision": precision}


def part(start: int, data: str, world_size: int, nodes: int, learned: dict) -> dict:
    """One stretch of a run with the same settings: `steps` [first, end) (the end moves as it trains), where the data
    was read from, the processes and nodes, and `settings()`."""
    return {"steps": [start, start], "data": data, "world_size": world_size, "nodes": nodes, **learned}


def saved_parts(saved: dict) -> list[dict]:
    """The parts a checkpoint holds. One written before parts existed gets one part from its config, without what
    that did not record (data digest, world size): those are then not compared."""
    if "parts" in saved:
        return saved["parts"]
    config = {**OLD_DEFAULTS, **saved["config"]}
    learned = {k: config[k] for k in PRETRAIN_LEARNED if k in config and k not in PRETRAIN_BY_DIGEST}
    if learned.get("mixed_precision") == "auto":  # resolved by the machine it ran on, which is not known
        del learned["mixed_precision"]
    return [{"steps": [0, saved["position"]["step"]], "data": config.get("data"), **learned}]


def same_settings(a: dict, b: dict) -> bool:
    """Whether two parts differ in nothing but their steps."""
    return {k: v for k, v in a.items() if k != "steps"} == {k: v for k, v in b.items() if k != "steps"}


def _said(name: str, old, new) -> str:
    if name in DIGEST_NAMES:
        short = [d[:DIGEST_SHOWN] if d else "none" for d in (old, new)]
        what = "weights" if name == "init_digest" else "manifest"
        return f"{DIGEST_NAMES[name]} {short[0]}, now {short[1]} ({what} sha256)"
    return f"{name} {old!r}, now {new!r}"


def resume_changes(out, last: dict, now: dict, position: Position, allow=()) -> dict[str, tuple]:
    """The changes of a resume from the checkpoint whose last part is `last` to a run with the part `now`:
    {name: (checkpoint's value, this run's)}, world_size and nodes included. Allowed: PRETRAIN_FREE (epochs only
    upwards), and the names in `allow` (batch_size only at an epoch's end; never fewer epochs than begun).

    Raises ConfigError, one line naming `out` and each refused setting with both values."""
    changes, refused, flaggable = {}, [], []  # refused: words; flaggable: what --allow-change could allow
    begun = position.epoch + (position.in_epoch > 0)
    for name in (*DIGEST_NAMES, *(n for n in PRETRAIN_LEARNED if n not in PRETRAIN_BY_DIGEST)):
        if name not in last or last[name] == now[name]:  # a setting an old checkpoint did not record: not compared
            continue
        old, new = last[name], now[name]
        if name == "epochs" and new < begun:
            refused.append(f"epochs {old}, now {new}, fewer than the {begun} it has begun")
        elif name == "batch_size" and name in allow and position.in_epoch:
            refused.append(f"{_said(name, old, new)}, mid-epoch (it may change only at an epoch's end)")
        elif name == "lr" or (name == "epochs" and new > old) or DIGEST_NAMES.get(name, name) in allow:
            changes[name] = (old, new)
        else:
            refused.append(_said(name, old, new))
            flaggable.append(DIGEST_NAMES.get(name, name))
    if refused:
        fixed = len(flaggable) < len(refused) or any(n in PRETRAIN_FIXED for n in flaggable)
        hint = "" if fixed else f", --allow-change {','.join(flaggable)} to change them anyway"
        raise ConfigError(
            f"{out} holds a run with other settings: {'; '.join(refused)}; "
            f"resume with the same settings{hint}, --force to start over, or use another --out"
        )
    for name in ("world_size", "nodes"):
        if last.get(name) is not None and last[name] != now[name]:
            changes[name] = (last[name], now[name])
    return changes


def build_run(
    cfg,
    device: torch.device,
    steps_per_epoch: int,
    classes: int,
    multilabel: bool,
    sync_batchnorm: bool = False,
    memory_format: torch.memory_format = torch.channels_last,
    backbone: dict[str, torch.Tensor] | None = None,
) -> RunState:
    """A fresh run for a PretrainConfig: its method (train/methods/), the model with the pieces the method
    needs (train/model.py PretrainModel: predictor, momentum encoder, queue) on `device` (channels_last unless told
    otherwise; the study's NCHW is `torch.contiguous_format`), its optimizer, the lr schedule over `cfg.epochs`
    epochs of optimizer steps (so a larger --epochs stretches a resumed run), and the online probe for `classes`
    outputs (none for 0 classes: no labels reach the run). Draws the initial weights from torch's global generator:
    seed it first. `sync_batchnorm`: the projector's and predictor's BatchNorms compute their statistics over all
    processes (GPUs only); a momentum encoder keeps per-process statistics (MoCo's shuffled BatchNorm needs them).
    `backbone`: the backbone's starting tensors (--init: train/transfer.py backbone_weights); the projector and
    predictor are drawn as without it, and a momentum encoder starts as a copy of the network with them."""
    model = PretrainModel(
        cfg.backbone, cfg.channels, cfg.projector, output_stride=cfg.output_stride, **model_pieces(cfg)
    )
    if backbone is not None:
        model.backbone.load_state_dict(backbone)
        if model.target is not None:  # the EMA copy starts from the given weights too
            model.target = MomentumEncoder(model.online())
    if sync_batchnorm:
        model.projector = nn.SyncBatchNorm.convert_sync_batchnorm(model.projector)
        if model.predictor is not None:
            model.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(model.predictor)
    model = model.to(device, memory_format=memory_format)
    probe = LinearProbe(model.backbone.num_features, classes, multilabel).to(device) if classes else None
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.exclude_bias_norm)
    updates_per_epoch = steps_per_epoch // cfg.grad_accum
    total_updates = cfg.epochs * updates_per_epoch
    scheduler = build_scheduler(optimizer, cfg.schedule, total_updates, round(cfg.warmup_epochs * updates_per_epoch))
    return RunState(model, build_method(cfg, scheduler, total_updates), optimizer, scheduler, probe)
