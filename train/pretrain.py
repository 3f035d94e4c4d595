"""Barlow Twins pretraining on a packed chest X-ray dataset.

    python train/pretrain.py --data data/packed/covid --out runs/bt            # one device
    accelerate launch train/pretrain.py --data ... --out ...                   # several GPUs or nodes
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train/pretrain.py ...  # 2 CPU processes (gloo)

Re-running with the same --out continues where the run stopped (mid-epoch included); a larger --epochs extends a
finished run. `--batch-size` is the global batch, split evenly over the processes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm
from twinray.pipelines import build_loader
from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.train import checkpoint
from twinray.train.config import ConfigError, PretrainConfig, check_batch_size, from_args
from twinray.train.distributed import StopVote, count_nodes
from twinray.train.loss import barlow_twins_loss
from twinray.train.model import BarlowTwins
from twinray.train.online_eval import EVAL_RECIPE, LinearProbe, knn_metrics, knn_scores
from twinray.train.optim import build_optimizer, build_scheduler

from twinray.atomic import write_json
from twinray.cli import InputError, run_cli

RESUME_MUST_MATCH = ("backbone", "channels", "projector", "optimizer")


class StopRequested(Exception):
    pass


class RunError(Exception):
    """Stops the run with one line (exit code 1), after keeping the last good checkpoint."""


def _signals(flag: dict) -> None:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary, then a clean exit."""

    def handler(signum, frame):
        flag["stop"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _mixed_precision(cfg: PretrainConfig, cuda: bool) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if cuda else "no"
    return cfg.mixed_precision


def _trackers(cfg: PretrainConfig):
    if cfg.wandb == "disabled":
        return None
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError("wandb is not installed: pip install wandb, or pass --wandb disabled") from None
    if cfg.wandb == "offline" or not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"  # never block on a login prompt
    return "wandb"


@torch.no_grad()
def _features(model, loader, accelerator):
    feats, labels = [], []
    for batch in loader:
        f, _ = model(batch.views[0])
        feats.append(f.float())
        labels.append(batch.labels)
    feats, labels = torch.cat(feats), torch.cat(labels)
    return accelerator.gather_for_metrics(feats), accelerator.gather_for_metrics(labels)


def knn_bank_rows(data: PackedDataset, limit: int, seed: int) -> np.ndarray:
    """The train rows kNN compares against: all of them, or a fixed random subset of `limit` rows, the same at
    every evaluation, so that the curve follows the model and not the sample."""
    rows = data.indices("train")
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def evaluate_knn(model, cfg, accelerator, classes: int, multilabel: bool, bank: np.ndarray) -> dict[str, float]:
    kw = dict(
        batch_size=max(1, cfg.batch_size // accelerator.num_processes),
        device=accelerator.device,
        recipe=EVAL_RECIPE,
        size=cfg.size,
        views=1,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        drop_last=False,
        workers=cfg.workers,
    )
    model.eval()
    train_f, train_y = _features(model, build_loader(cfg.data, "train", rows=bank, **kw), accelerator)
    try:
        val_f, val_y = _features(model, build_loader(cfg.data, "val", **kw), accelerator)
    except ValueError:  # an empty val split
        model.train()
        return {}
    model.train()
    return knn_metrics(knn_scores(train_f, train_y, val_f, classes, multilabel, k=cfg.knn_k), val_y, multilabel)


def _peak_memory_mb(cuda: bool) -> float:
    """GPU: the allocator's peak. CPU: the process' peak resident set."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_backbone(model, cfg: PretrainConfig, out: Path) -> None:
    backbone = model.backbone
    metadata = {"timm_name": cfg.backbone, "in_chans": str(cfg.channels)}
    checkpoint.save_weights(out / "backbone.safetensors", backbone, metadata)
    info = {
        "timm_name": cfg.backbone,
        "in_chans": cfg.channels,
        "num_features": backbone.num_features,
        "size": cfg.size,
        "pretrained_on": cfg.data,
    }
    write_json(out / "backbone.json", info)


def train(cfg: PretrainConfig) -> dict:
    out = Path(cfg.out)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg, torch.cuda.is_available()),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(cfg),
        project_dir=str(out),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    check_batch_size(cfg.batch_size, world)  # at least 2 images per process and step, before anything is written
    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    device = accelerator.device
    cuda = device.type == "cuda"
    use_compile = cuda if cfg.compile is None else cfg.compile

    shard_cache.configure(cfg.shard_cache, cfg.shard_cache_limit, cfg.storage_options)  # for a --data URL
    loader = build_loader(
        cfg.data,
        "train",
        backend=cfg.backend,
        batch_size=cfg.batch_size // world,
        device=device,
        recipe=cfg.recipe,
        size=cfg.size,
        views=2,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        drop_last=True,
        workers=cfg.workers,
        cache=cfg.cache,
    )
    data = loader.data
    multilabel = data.task == "multilabel"
    bank = knn_bank_rows(data, cfg.knn_bank, cfg.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the train split ({len(loader.rows)} images): "
            "an epoch would have no step"
        )

    model = BarlowTwins(cfg.backbone, cfg.channels, cfg.projector)
    if world > 1 and cuda:  # SyncBatchNorm runs on GPUs only; CPU processes keep per-process BN statistics
        model.projector = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.projector)
    model = model.to(device, memory_format=torch.channels_last)
    probe = LinearProbe(model.backbone.num_features, len(data.classes), multilabel).to(device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.exclude_bias_norm)
    # The schedule counts optimizer steps; built from --epochs, so a larger --epochs stretches a resumed run.
    updates_per_epoch = steps_per_epoch // cfg.grad_accum
    scheduler = build_scheduler(
        optimizer, cfg.schedule, cfg.epochs * updates_per_epoch, round(cfg.warmup_epochs * updates_per_epoch)
    )

    # Resume: everything, including where in the epoch the data stopped.
    step, epoch, in_epoch = 0, 0, 0
    latest = checkpoint.latest(out)
    if latest is not None:
        state = checkpoint.load(latest)
        for name in RESUME_MUST_MATCH:  # the saved tensors only fit the same architecture and optimizer
            if state["config"][name] != getattr(cfg, name):
                raise ConfigError(
                    f"{out} holds a run with {name} {state['config'][name]!r}, not {getattr(cfg, name)!r}: "
                    "use the same setting or another --out"
                )
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        probe.optimizer.load_state_dict(state["probe_optimizer"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)  # this run's --lr, not the saved one
        for group, lr in zip(optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr
        torch.set_rng_state(state["rng"]["torch"])
        if cuda and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        if accelerator.scaler is not None and "scaler" in state:  # fp16 loss scale
            accelerator.scaler.load_state_dict(state["scaler"])
        step, epoch, in_epoch = state["position"]["step"], state["position"]["epoch"], state["position"]["in_epoch"]
        accelerator.print(f"resuming from {latest.name}: epoch {epoch}, step {in_epoch} of {steps_per_epoch}")

    compiled = torch.compile(model, mode=cfg.compile_mode) if use_compile else model
    compiled, optimizer = accelerator.prepare(compiled, optimizer)
    nodes = count_nodes()  # a collective: every rank
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**cfg.to_dict(), "world_size": world, "nodes": nodes})
        if accelerator.log_with:
            accelerator.init_trackers(
                "twinray",
                config={**cfg.to_dict(), "world_size": world, "nodes": nodes},
                init_kwargs={"wandb": {"dir": str(out)}},
            )
    metrics_file = out / "metrics.jsonl"
    flag: dict = {}
    _signals(flag)
    vote = StopVote()  # every rank stops after the same step (train/distributed.py)

    def save(position_epoch: int, position_in_epoch: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {
                "model": model.state_dict(),  # DDP and compile wrap this module; it holds the weights
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "probe": probe.state_dict(),
                "probe_optimizer": probe.optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else []},
                "position": {"step": step, "epoch": position_epoch, "in_epoch": position_in_epoch},
                "config": cfg.to_dict(),
            }
            if accelerator.scaler is not None:
                state["scaler"] = accelerator.scaler.state_dict()
            checkpoint.save(out, step, state, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    def log(row: dict) -> None:
        if accelerator.is_main_process:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(row) + "\n")
            accelerator.log(row, step=row["step"])

    summary: dict = {}
    last: dict = {}  # the latest settled step's loss and probe figures, as floats
    sums: dict = {}  # this epoch's settled figures, summed over its steps, for the epoch line
    pending: list = []  # the latest step's (step, epoch, figures), still on the device

    def settle() -> None:
        """Reads the pending step's figures in one device sync, stops on a non-finite loss, adds to the sums.
        Each step is settled only after the next one is queued, so the GPU never idles while Python catches up;
        everything that logs or saves settles first, so a checkpoint never holds weights after a bad loss."""
        nonlocal last
        if not pending:
            return
        at_step, at_epoch, figures = pending.pop()
        values = dict(zip(figures, torch.stack([v.float() for v in figures.values()]).tolist()))
        if not math.isfinite(values["loss"]):
            raise RunError(
                f"loss is {values['loss']} at step {at_step} (epoch {at_epoch}); "
                f"the last good checkpoint is kept in {out}"
            )
        last = values
        for key, value in {**values, "steps": 1}.items():
            sums[key] = sums.get(key, 0.0) + value

    compiled.train()
    try:
        while epoch < cfg.epochs:
            loader.set_epoch(epoch, start_step=in_epoch)
            sums.clear()
            with tqdm(
                total=steps_per_epoch,
                initial=in_epoch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                disable=not accelerator.is_main_process,
                leave=False,
            ) as bar:  # closed on errors too, so the error line comes last
                waited, window_start, window_images = 0.0, time.perf_counter(), 0
                fetch_start = time.perf_counter()
                for batch in loader:
                    waited += time.perf_counter() - fetch_start
                    with accelerator.accumulate(compiled):
                        f1, z1 = compiled(batch.views[0])
                        _, z2 = compiled(batch.views[1])
                        loss, terms = barlow_twins_loss(z1, z2, cfg.lambd)
                        # Every process computes the same global loss, and its collectives' backward sums over ranks;
                        # DDP's averaging then gives exactly the single-process gradient (see train/loss.py).
                        accelerator.backward(loss)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    figures = {"loss": loss.detach(), **terms, **probe.step(f1, batch.labels)}
                    settle()  # the previous step, which the GPU has finished by now or nearly
                    pending.append((step, epoch, figures))
                    step += 1
                    in_epoch += 1
                    window_images += batch.views[0].shape[0] * world
                    bar.update()
                    if step % cfg.log_every == 0 or in_epoch == steps_per_epoch:
                        settle()
                        now = time.perf_counter()
                        row = {
                            "step": step,
                            "epoch": epoch,
                            **last,
                            "lr": scheduler.get_last_lr()[0],
                            "images_per_s": window_images / (now - window_start),
                            "data_wait": waited / (now - window_start),
                            "peak_memory_mb": _peak_memory_mb(cuda),
                        }
                        log(row)
                        bar.set_postfix(loss=f"{row['loss']:.2f}", img_s=f"{row['images_per_s']:.0f}")
                        waited, window_start, window_images = 0.0, now, 0
                    agreed = vote(flag.get("stop"))
                    if agreed:
                        settle()
                        save(epoch, in_epoch)
                        raise StopRequested(agreed)
                    if cfg.max_steps and step >= cfg.max_steps:
                        settle()
                        save(epoch, in_epoch)
                        raise StopRequested("max_steps")
                    fetch_start = time.perf_counter()
                settle()
            epoch, in_epoch = epoch + 1, 0
            means = {k: v / sums["steps"] for k, v in sums.items() if k != "steps"} if sums else {}
            row = {"step": step, "epoch": epoch - 1, "epoch_end": True, **means}
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                row.update(evaluate_knn(compiled, cfg, accelerator, len(data.classes), multilabel, bank))
            log(row)
            summary = row
            save(epoch, 0)  # before the epoch line: a reader that has left (`| head`) costs no work
            score = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("probe_acc", "knn")))
            accelerator.print(f"epoch {epoch}/{cfg.epochs}  mean loss {row.get('loss', float('nan')):.2f}  {score}")
    except StopRequested as why:
        accelerator.print(f"stopped ({why}) at step {step}; checkpoint saved, re-run to continue")
        vote.close()
        accelerator.end_training()
        return {"stopped": str(why), "step": step}
    if accelerator.is_main_process:
        export_backbone(model, cfg, out)
    vote.close()
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = from_args(argv)
        train(cfg)
    except (ConfigError, InputError, ValueError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
