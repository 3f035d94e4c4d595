"""Self-supervised pretraining on a packed chest X-ray dataset: Barlow Twins by default, or SimCLR, MoCo v2, BYOL
or VICReg (`--method`, each with its papers' defaults: docs/methods.md).

    python train/pretrain.py --data data/packed/covid --out runs/bt            # one device
    python train/pretrain.py --method byol --data ... --out runs/byol          # another objective
    accelerate launch train/pretrain.py --data ... --out ...                   # several GPUs or nodes
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train/pretrain.py ...  # 2 CPU processes (gloo)

Re-running with the same --out continues where the run stopped (mid-epoch included); a larger --epochs extends a
finished run. `--batch-size` is the global batch, split evenly over the processes.

Where things are: the step is train/step.py (`train_step`; each method's forward and loss, train/objectives.py;
the model with its momentum encoder, queue or predictor, train/model.py `PretrainModel`); the run's state
and what a checkpoint holds, train/state.py (`RunState`); reading the figures one step late, train/meter.py. Below,
`train()` reads top to bottom: setup, resume, then the loop (step, metrics, checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from twinray.atomic import write_json
from twinray.cli import InputError, run_cli, say_error
from twinray.pipelines import build_loader
from twinray.prep import shard_cache
from twinray.prep.format import PackedDataset
from twinray.train import checkpoint
from twinray.train.config import ConfigError, PretrainConfig, check_batch_size, from_args
from twinray.train.distributed import StopVote, count_nodes
from twinray.train.meter import NonFiniteLoss, StepMeter
from twinray.train.online_eval import EVAL_RECIPE, knn_metrics, knn_scores
from twinray.train.state import RunState, build_run, mismatch
from twinray.train.step import compile_model, new_iteration, train_step


def _stop_on_signals() -> dict:
    """SIGTERM/SIGINT ask for a checkpoint at the next step boundary, then a clean exit: the returned dict gets
    "stop": the signal's name."""
    flag: dict = {}

    def handler(signum, frame):
        flag["stop"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return flag


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
        new_iteration()
        f, _ = model(batch.views[0])
        feats.append(f.to(torch.float32, copy=True))  # a copy: CUDA graphs reuse their output buffers
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
    with build_loader(cfg.data, "train", rows=bank, **kw) as bank_loader:  # its threads end here, each evaluation
        train_f, train_y = _features(model, bank_loader, accelerator)
    try:
        with build_loader(cfg.data, "val", **kw) as val_loader:
            val_f, val_y = _features(model, val_loader, accelerator)
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


def resume(run: RunState, cfg: PretrainConfig, accelerator, steps_per_epoch: int) -> None:
    """Puts `run` back where the latest checkpoint in --out left it (model, optimizer, schedule, probe, loss scale,
    RNG, position in the data); nothing to do for a new run."""
    latest = checkpoint.latest(cfg.out)
    if latest is None:
        return
    saved = checkpoint.load(latest)
    why = mismatch(saved["config"], cfg)
    if why:
        raise ConfigError(f"{cfg.out} holds a run with {why}: use the same setting or another --out")
    run.load_state_dict(saved, lr=cfg.lr)  # this run's --lr, not the saved one
    pos = run.position
    accelerator.print(f"resuming from {latest.name}: epoch {pos.epoch}, step {pos.in_epoch} of {steps_per_epoch}")


def save(run: RunState, cfg: PretrainConfig, accelerator) -> None:
    """The one place a checkpoint is written: the run's state and its config, by the main process, once every
    process has reached the same step."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**run.state_dict(), "config": cfg.to_dict()}
        checkpoint.save(cfg.out, run.position.step, state, keep=cfg.keep_checkpoints)
    accelerator.wait_for_everyone()


def log(row: dict, accelerator, path: Path) -> None:
    """One line of metrics.jsonl (and the trackers'), from the main process."""
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        accelerator.log(row, step=row["step"])


def train(cfg: PretrainConfig) -> dict:
    # ---- setup: processes, data, the run's state ------------------------------------------------------------
    out = Path(cfg.out)
    accelerator = Accelerator(
        mixed_precision=_mixed_precision(cfg, torch.cuda.is_available()),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(cfg),
        project_dir=str(out),
    )
    world = accelerator.num_processes
    check_batch_size(cfg.batch_size, world)  # at least 2 images per process and step, before anything is written
    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    device = accelerator.device
    cuda = device.type == "cuda"
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
        rank=accelerator.process_index,
        world_size=world,
        drop_last=True,
        workers=cfg.workers,
        cache=cfg.cache,
    )
    data = loader.data
    classes, multilabel = len(data.classes), data.task == "multilabel"
    bank = knn_bank_rows(data, cfg.knn_bank, cfg.seed)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the train split ({len(loader.rows)} images): "
            "an epoch would have no step"
        )
    # SyncBatchNorm runs on GPUs only; CPU processes keep per-process BN statistics.
    run = build_run(cfg, device, steps_per_epoch, classes, multilabel, sync_batchnorm=world > 1 and cuda)
    run.scaler = accelerator.scaler  # fp16's loss scale, None otherwise

    # ---- resume: everything, including where in the epoch the data stopped -----------------------------------
    resume(run, cfg, accelerator, steps_per_epoch)
    pos = run.position

    model = compile_model(run.model, cuda if cfg.compile is None else cfg.compile, cfg.compile_mode)
    model, optimizer = accelerator.prepare(model, run.optimizer)
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
    stop = _stop_on_signals()
    vote = StopVote()  # every rank stops after the same step (train/distributed.py)
    meter = StepMeter()
    summary: dict = {}

    # ---- the loop ---------------------------------------------------------------------------------------------
    model.train()
    stopped = None  # why the run stops early: a signal's name or "max_steps"
    cache_note = loader.cache_note
    while pos.epoch < cfg.epochs and not stopped:
        loader.set_epoch(pos.epoch, start_step=pos.in_epoch)
        meter.new_epoch()
        bar = tqdm(
            total=steps_per_epoch,
            initial=pos.in_epoch,
            desc=f"epoch {pos.epoch + 1}/{cfg.epochs}",
            disable=not accelerator.is_main_process,
            leave=False,
        )
        with bar:  # closed on errors too, so the error line comes last
            for batch in meter.batches(loader):
                # -- the step: the method's loss, backward, update, then the online probe
                with accelerator.accumulate(model):
                    figures = train_step(
                        model,
                        run.method,
                        batch.views,
                        optimizer,
                        backward=accelerator.backward,
                        probe=run.probe,
                        labels=batch.labels,
                    )
                    if accelerator.sync_gradients:
                        run.scheduler.step()
                # -- the loss: this step's figures are held and the previous step's read, while the device works
                meter.push(figures, images=batch.views[0].shape[0] * world, step=pos.step, epoch=pos.epoch)
                pos.step += 1
                pos.in_epoch += 1
                bar.update()
                # -- metrics.jsonl every log_every steps and at the epoch's end
                if pos.step % cfg.log_every == 0 or pos.in_epoch == steps_per_epoch:
                    meter.settle()  # a non-finite loss stops the run here, before anything is saved
                    row = {
                        "step": pos.step,
                        "epoch": pos.epoch,
                        **meter.last,
                        "lr": run.scheduler.get_last_lr()[0],
                        **meter.window(),
                        "peak_memory_mb": _peak_memory_mb(cuda),
                    }
                    log(row, accelerator, out / "metrics.jsonl")
                    bar.set_postfix(loss=f"{row['loss']:.2f}", img_s=f"{row.get('images_per_s', 0):.0f}")
                # -- an early stop: SIGTERM/SIGINT, or --max-steps
                at_max = "max_steps" if cfg.max_steps and pos.step >= cfg.max_steps else None
                stopped = vote(stop.get("stop")) or at_max
                if stopped:
                    break
            meter.settle()
        if stopped:
            break

        # ---- the epoch's end: means, kNN, checkpoint, then the epoch line ---------------------------------------
        pos.epoch, pos.in_epoch = pos.epoch + 1, 0
        row = {"step": pos.step, "epoch": pos.epoch - 1, "epoch_end": True, **meter.epoch_means()}
        if pos.epoch % cfg.eval_every == 0 or pos.epoch == cfg.epochs:
            row.update(evaluate_knn(model, cfg, accelerator, classes, multilabel, bank))
        log(row, accelerator, out / "metrics.jsonl")
        summary = row
        save(run, cfg, accelerator)  # before the epoch line: a reader that has left (`| head`) costs no work
        if cache_note:  # where the cache went: with the run's first epoch line
            accelerator.print(cache_note)
            cache_note = None
        score = " ".join(f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("probe_acc", "knn")))
        accelerator.print(f"epoch {pos.epoch}/{cfg.epochs}  mean loss {row.get('loss', float('nan')):.2f}  {score}")

    # ---- the run's end: a checkpoint to continue from, or the backbone ----------------------------------------
    loader.close()  # its decode pool and any epoch left open end now (pipelines/loader.py)
    vote.close()
    if stopped:
        save(run, cfg, accelerator)
        accelerator.print(f"stopped ({stopped}) at step {pos.step}; checkpoint saved, re-run to continue")
        summary = {"stopped": stopped, "step": pos.step}
    elif accelerator.is_main_process:
        export_backbone(run.model, cfg, out)
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = from_args(argv)
        train(cfg)
    except (ConfigError, InputError, ValueError) as e:
        say_error("pretrain", str(e))
        return 2
    except NonFiniteLoss as e:  # exit 1: the data and flags were fine, the run diverged
        say_error("pretrain", f"{e}; the last good checkpoint is kept in {cfg.out}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
