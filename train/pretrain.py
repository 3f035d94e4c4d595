"""Self-supervised pretraining on a packed chest X-ray dataset: Barlow Twins by default, or SimCLR, MoCo v2, BYOL
or VICReg (`--method`, each with its papers' defaults: docs/methods.md).

    python train/pretrain.py --data data/packed/covid --out runs/bt            # one device
    python train/pretrain.py --method byol --data ... --out runs/byol          # another objective
    accelerate launch train/pretrain.py --data ... --out ...                   # several GPUs or nodes
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 train/pretrain.py ...  # 2 CPU processes (gloo)

Re-running with the same --out continues where the run stopped (mid-epoch included), when the data and the settings
that change what is learned are the checkpoint's; a larger --epochs extends a finished run. Anything else is refused
in one line before --out changes, unless --allow-change names it; --force starts over (docs/pretrain.md).
`--batch-size` is the global batch, split evenly over the processes.

Where things are: the step is train/step.py (`train_step`, with gradient accumulation and the lr schedule;
each method's forward and loss, train/methods/<name>.py; the model with its momentum encoder, queue or
predictor, train/model.py `PretrainModel`); the run's state and what a checkpoint holds, train/state.py
(`RunState`); reading the figures one step late, and the epoch's progress bar, train/meter.py; what a re-run shares
with finetune's, train/resume.py. Below, `_train()` reads top to bottom: setup, resume, then the loop (step,
metrics, checkpoint), each part a call to a helper defined above it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed

from twinray.atomic import atomic, naming, write_json
from twinray.cli import InputError, run_cli, say_error
from twinray.lock import exclusive
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE, Recipe, load_recipe
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.train import checkpoint, health, preprocessing, runlog, transfer
from twinray.train.config import ConfigError, PretrainConfig, check_batch_size, from_args, parse_allow_change
from twinray.train.distributed import StopVote, count_nodes
from twinray.train.meter import NonFiniteLoss, StepMeter
from twinray.train.online_eval import (
    MIN_PROBE_BATCH,
    NO_LABELS,
    LabelSource,
    ProbeStream,
    knn_metrics,
    knn_scores,
    label_source,
)
from twinray.train.resume import latest_checkpoint
from twinray.train.state import (
    Position,
    RunState,
    build_run,
    part,
    resume_changes,
    same_settings,
    saved_parts,
    settings,
)
from twinray.train.step import compile_model, new_iteration, train_step
from twinray.usage import program


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


def _trackers(cfg: PretrainConfig) -> list[str] | None:
    """Accelerate's `log_with` for --report-to (train/runlog.py), less wandb under --wandb disabled. Raises
    ConfigError, one line naming the package, for a tracker whose package is missing: before anything is written.
    wandb runs offline unless --wandb online and WANDB_API_KEY is set (it never waits on a login prompt)."""
    names = [n for n in runlog.parse_report_to(cfg.report_to) if not (n == "wandb" and cfg.wandb == "disabled")]
    try:
        names = runlog.check_trackers(tuple(names))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "wandb" in names and (cfg.wandb == "offline" or not os.environ.get("WANDB_API_KEY")):
        os.environ["WANDB_MODE"] = "offline"
    return names or None


@torch.no_grad()
def _features(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(backbone features, projector embeddings, labels) of every image the loader yields, gathered from every
    process, in float32."""
    feats, embs, labels = [], [], []
    for batch in loader:
        new_iteration()
        f, z = model(batch.views[0])[:2]
        feats.append(f.to(torch.float32, copy=True))  # a copy: CUDA graphs reuse their output buffers
        embs.append(z.to(torch.float32, copy=True))
        labels.append(batch.labels)
    return tuple(accelerator.gather_for_metrics(torch.cat(x)) for x in (feats, embs, labels))


@torch.no_grad()
def _view_pairs(model, loader, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """The projector embeddings of both augmented views of every image the loader yields, gathered."""
    z1, z2 = [], []
    for batch in loader:
        for views, out in ((batch.views[0], z1), (batch.views[1], z2)):
            new_iteration()
            out.append(model(views)[1].to(torch.float32, copy=True))
    return accelerator.gather_for_metrics(torch.cat(z1)), accelerator.gather_for_metrics(torch.cat(z2))


def knn_bank_rows(data: PackedDataset, limit: int, seed: int) -> np.ndarray:
    """The train rows kNN compares against: all of them, or a fixed random subset of `limit` rows, the same at
    every evaluation, so that the curve follows the model and not the sample."""
    rows = data.indices("train")
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


HEALTH_PAIRS = 512  # bank images whose two augmented views give the cross-correlation figures (docs/health.md)


def shard_settings(cfg: PretrainConfig, accelerator, **fields) -> LoaderSettings:
    """LoaderSettings (pipelines/base.py) for this process' shard of a split: the run's view size, seed, device,
    rank and world size, and --data's URL cache; `fields` give the rest (split, batch_size, recipe, views,
    drop_last, workers, rows)."""
    return LoaderSettings(
        device=accelerator.device,
        size=cfg.size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shard_cache=CacheSettings.from_args(cfg),
        **fields,
    )


def evaluate(model, cfg, accelerator, bank: np.ndarray, labels: LabelSource | None, knn_bank=None) -> dict:
    """The evaluation row's figures: the representation-health figures of `bank`, rows of --data's train split
    (train/health.py: rankme, emb_std; corr_diag and corr_off for Barlow Twins, on two views of HEALTH_PAIRS bank
    images under the run's recipe; they need no labels), with health_s, what they cost; then, with `labels`, kNN on
    its val split against `knn_bank`, rows of its train split (train/online_eval.py; --data's own labels reuse the
    health bank's features), named by `eval_data` and `eval_data_digest`. None: no kNN (unlabeled data)."""
    eval_settings = shard_settings(
        cfg,
        accelerator,
        batch_size=max(1, cfg.batch_size // accelerator.num_processes),
        recipe=EVAL_RECIPE,
        views=1,
        drop_last=False,
        workers=cfg.workers,
    )
    model.eval()
    with build_loader(
        cfg.data, replace(eval_settings, split="train", rows=bank)
    ) as bank_loader:  # its threads end here, each evaluation
        train_f, train_z, train_y = _features(model, bank_loader, accelerator)
    start = time.perf_counter()
    pairs = None
    if cfg.method == "barlow" and len(bank) >= 2:
        with build_loader(
            cfg.data, replace(eval_settings, split="train", rows=bank[:HEALTH_PAIRS], recipe=cfg.recipe, views=2)
        ) as pl:
            pairs = _view_pairs(model, pl, accelerator)
    row = {**health.figures(train_f, train_z, pairs), "health_s": round(time.perf_counter() - start, 3)}
    val_f = None
    if labels is not None:
        if labels.external:
            with build_loader(labels.location, replace(eval_settings, split="train", rows=knn_bank)) as bank_loader:
                train_f, _, train_y = _features(model, bank_loader, accelerator)
        try:
            with build_loader(labels.location, replace(eval_settings, split="val")) as val_loader:
                val_f, _, val_y = _features(model, val_loader, accelerator)
        except ValueError:  # an empty val split (or fewer images than processes): no kNN
            val_f = None
    model.train()
    if val_f is not None:
        scores = knn_scores(train_f, train_y, val_f, len(labels.classes), labels.multilabel, k=cfg.knn_k)
        row.update(knn_metrics(scores, val_y, labels.multilabel))
        row.update(eval_data=labels.location, eval_data_digest=labels.digest)
    return row


def _device_line(device: torch.device, world: int, nodes: int, precision: str) -> str:
    """train.log's device line: "cuda:0 (NVIDIA H100 80GB HBM3), 8 processes on 1 node, bf16"."""
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    many = "es" if world > 1 else ""
    return f"{device}{name}, {world} process{many} on {nodes} node{'s' if nodes > 1 else ''}, precision {precision}"


def _peak_memory_mb(cuda: bool) -> float:
    """GPU: the allocator's peak. CPU: the process' peak resident set."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_backbone(model, cfg: PretrainConfig, out: Path, parts: list[dict], manifest: dict) -> None:
    """backbone.safetensors (timm's names) and backbone.json: the timm model, the data (its path, and the digest of
    its manifest), the preprocessing its inputs had (train/preprocessing.py: input range, normalisation, the prep
    settings that made the pixels) and every setting it was trained with, part by part (docs/pretrain.md)."""
    backbone = model.backbone
    metadata = {"timm_name": cfg.backbone, "in_chans": str(cfg.channels), "output_stride": str(cfg.output_stride)}
    checkpoint.save_weights(out / "backbone.safetensors", backbone, metadata)
    info = {
        "timm_name": cfg.backbone,
        "in_chans": cfg.channels,
        "output_stride": cfg.output_stride,
        "num_features": backbone.num_features,
        "size": cfg.size,
        "pretrained_on": cfg.data,
        "dataset": manifest.get("dataset"),
        "data_digest": parts[-1]["data_digest"],
        "preprocessing": preprocessing.record(manifest, cfg.size, cfg.channels),
        "parts": parts,
    }
    write_json(out / "backbone.json", info)


def write_config(cfg: PretrainConfig, parts: list[dict]) -> None:
    """config.json: this launch's settings, its world size and nodes, the data's digest, and every part of the run
    with its step range (a resume that changed a setting starts a part); each part, and the top level for the last
    one, holds the recipe as it ran at that size (`recipe_effective`: Recipe.at_size, docs/augmentation.md)."""
    now = parts[-1]
    keys = ("world_size", "nodes", "data_digest", "eval_data_digest", "init_digest", "recipe_effective")
    extra = {k: now.get(k) for k in keys}
    write_json(Path(cfg.out) / "config.json", {**cfg.to_dict(), **extra, "parts": parts})


# What a pretraining writes in --out, which --force discards; anything else there stays.
OUTPUTS = (
    "config.json",
    "metrics.jsonl",
    "train.log",
    "curves.png",
    "backbone.safetensors",
    "backbone.json",
    "wandb",
    "tensorboard",
    "mlruns",
)


def discard(out: Path) -> list[str]:
    """--force: removes the checkpoints (a half-written one too) and OUTPUTS from `out`. Returns the names removed."""
    found = [*out.glob(f"{checkpoint.PREFIX}*"), *out.glob(f".{checkpoint.PREFIX}*"), *(out / n for n in OUTPUTS)]
    gone = []
    for path in sorted(p for p in found if p.exists() or p.is_symlink()):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        gone.append(path.name)
    return gone


def trim_metrics(path: Path, step: int) -> None:
    """Drops the metrics.jsonl lines past `step`, which a run killed after its last checkpoint logged, so that a
    resume from that checkpoint logs no step twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step(line) is not None and _step(line) <= step]
    if len(kept) < len(lines):
        with atomic(path) as tmp:
            tmp.write_text("".join(kept))


def _step(line: str) -> int | None:
    """A metrics.jsonl line's step; None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


@contextmanager
def one_writer(out: Path, accelerator):
    """Holds the lock of `out` (twinray/lock.py) while the block runs. The launch's main process takes it and tells
    the others whether it was refused, so that every process of a refused launch stops with the same InputError,
    and the processes of one launch never refuse each other."""
    with ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(exclusive(out, "pretraining"))
            except InputError as e:
                refusal = str(e)
        if accelerator.num_processes > 1:
            refusal = broadcast_object_list([refusal])[0]
        if refusal:
            raise InputError(refusal)
        yield


def plan(cfg: PretrainConfig, now: dict, allow, force: bool) -> tuple[dict | None, list[dict], dict]:
    """What --out holds, read before anything there changes: (the checkpoint to resume from, or None; the run's
    parts, `now` last, its steps set; the allowed changes {name: (checkpoint's value, this run's)}). Raises
    ConfigError, one line, for a checkpoint with other settings (train/state.py resume_changes), or for a backbone
    with no checkpoint to resume (a finished run is not replaced without --force)."""
    out = Path(cfg.out)
    saved = latest_checkpoint(out, force)  # as finetune reads its own (train/resume.py)
    if saved is None:
        if not force and (out / "backbone.safetensors").exists():
            raise ConfigError(
                f"{out} holds a finished backbone but no checkpoint to resume from: --force to discard it and start "
                "over, or use another --out"
            )
        return None, [now], {}
    pos = Position(**saved["position"])
    parts = saved_parts(saved)
    changes = resume_changes(out, parts[-1], now, pos, allow)
    if same_settings(parts[-1], now):  # the same part goes on
        now["steps"] = [parts.pop()["steps"][0], pos.step]
    else:
        now["steps"] = [pos.step, pos.step]
    return saved, [*parts, now], changes


def resume(run: RunState, cfg: PretrainConfig, saved: dict, changes: dict, accelerator, steps_per_epoch: int) -> None:
    """Puts `run` back where checkpoint `saved` left it (model, optimizer, schedule, probe, loss scale, RNG, position
    in the data), with this run's --lr; says so, and what changed, in a line each."""
    # this run's --lr, not the saved one; a fresh probe when --eval-data changed (--allow-change eval_data)
    run.load_state_dict(saved, lr=cfg.lr, probe="eval_data_digest" not in changes)
    pos = run.position
    accelerator.print(f"resuming from {saved['name']}: epoch {pos.epoch}, step {pos.in_epoch} of {steps_per_epoch}")
    if changes:
        said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
        accelerator.print(f"changed since the checkpoint: {said} (config.json records each part)")


def save(run: RunState, cfg: PretrainConfig, accelerator, parts: list[dict]) -> None:
    """The one place a checkpoint is written: the run's state, its config and its parts (the last one ending at this
    step), by the main process, once every process has reached the same step; config.json follows it."""
    parts[-1]["steps"][1] = run.position.step
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**run.state_dict(), "config": cfg.to_dict(), "parts": parts}
        checkpoint.save(cfg.out, run.position.step, state, keep=cfg.keep_checkpoints)
        write_config(cfg, parts)
    accelerator.wait_for_everyone()


def log(row: dict, accelerator, path: Path) -> None:
    """One line of metrics.jsonl (and the trackers'), from the main process."""
    if accelerator.is_main_process:
        with naming(path), open(path, "a") as f:  # a full disk names metrics.jsonl
            f.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if not isinstance(v, str)}, step=row["step"])  # numbers


def train(cfg: PretrainConfig, allow_change=(), force: bool = False, command: str | None = None) -> dict:
    """A pretraining run in cfg.out: a new one, or the one there resumed (docs/pretrain.md says when). `allow_change`:
    learned settings that may differ from the checkpoint's (train/config.py parse_allow_change); `force`: discard
    what cfg.out holds and start over. Holds cfg.out's lock throughout. Raises ConfigError or InputError (one line)
    before anything in cfg.out changes. `command`: the command line train.log records (default: sys.argv).
    Returns the last epoch's row, {"stopped", "step"} or {"done", "step"}."""
    precision = _mixed_precision(cfg, torch.cuda.is_available())
    out = Path(cfg.out)
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=_trackers(cfg),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )  # writes nothing in --out
    command = command or runlog.command_line(None, program("pretrain", "twinray.train.pretrain"))
    with one_writer(out, accelerator):  # a second launch on this --out is refused here
        return _train(cfg, accelerator, precision, allow_change, force, command)


@dataclass
class Inputs:
    """What setup read and checked before --out is looked at: the node count, the data's digest (by content), the
    labels of the kNN and the probe (None: unlabeled data and no --eval-data), --eval-data's digest, --init's
    backbone tensors and record (`init`, `sha256`; both None for random weights), the recipe as it runs, and this
    launch's part of the run (train/state.py `part`, with `recipe_effective`)."""

    nodes: int
    digest: str
    labels: LabelSource | None
    eval_digest: str | None
    start: dict | None
    started: dict | None
    recipe: Recipe
    part: dict


def _inputs(cfg: PretrainConfig, accelerator, precision: str) -> Inputs:
    """Seeds the run and reads its inputs, on every process. Raises ConfigError (a batch too small for the
    processes) or InputError/ValueError (unreadable data, --eval-data or --init), before anything is written."""
    world = accelerator.num_processes
    check_batch_size(cfg.batch_size, world)  # at least 2 images per process and step, before anything is written
    nodes = count_nodes()  # a collective: every rank
    set_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    cache = CacheSettings.from_args(cfg)  # for a --data URL
    training_data = open_dataset(cfg.data, cache)
    digest = training_data.digest  # the data, by content
    # the labels of the kNN and the probe: --eval-data (checked here, before --out changes), --data's own, or none
    labels = label_source(training_data, cfg.data, cfg.eval_data, cfg.size, world, cache)
    eval_digest = labels.digest if labels is not None and labels.external else None
    # --init: the backbone's starting weights, read and checked here too (train/transfer.py), known by their sha256
    start, started = None, None
    if cfg.init not in (None, "random"):
        start, started = transfer.backbone_weights(cfg.init, cfg.backbone, cfg.channels, cfg.output_stride)
    init_digest = started["sha256"] if started else None
    # the augmentation as it runs at this size (Recipe.at_size), read once: the loader and every part's record use it
    recipe = load_recipe(cfg.recipe)
    now = part(0, cfg.data, world, nodes, settings(cfg, digest, precision, eval_digest, init_digest))
    now["recipe_effective"] = recipe.at_size(cfg.size).effective()
    return Inputs(nodes, digest, labels, eval_digest, start, started, recipe, now)


def _nothing_to_do(cfg: PretrainConfig, saved: dict) -> tuple[str, dict] | None:
    """A checkpoint that needs no more training, as (the line that says so, train()'s return): the run finished
    (--epochs reached, the backbone written) or stopped at --max-steps. None: training goes on."""
    out, pos = Path(cfg.out), Position(**saved["position"])
    if pos.epoch >= cfg.epochs and (out / "backbone.safetensors").is_file():
        said = (
            f"{out} is already done: {pos.epoch} epochs, {pos.step} steps; nothing changed "
            "(a larger --epochs continues it, --force starts over)"
        )
        return said, {"done": True, "step": pos.step}
    if cfg.max_steps and pos.step >= cfg.max_steps:
        said = f"{out} stopped at step {pos.step} (--max-steps {cfg.max_steps}); nothing changed"
        return said, {"stopped": "max_steps", "step": pos.step}
    return None


def _train_loader(cfg: PretrainConfig, accelerator, recipe: Recipe):
    """The two-view loader over this process' shard of --data's train split. Raises ConfigError when an epoch
    would have no step (--batch-size larger than the split)."""
    world = accelerator.num_processes
    loader = build_loader(
        cfg.data,
        shard_settings(
            cfg,
            accelerator,
            split="train",
            batch_size=cfg.batch_size // world,
            recipe=recipe,
            views=2,
            drop_last=True,
            workers=cfg.workers,
        ),
        backend=cfg.backend,
        cache=cfg.cache,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the train split ({len(loader.rows)} images): "
            "an epoch would have no step"
        )
    return loader


def _banks(cfg: PretrainConfig, data: PackedDataset, labels: LabelSource | None) -> tuple:
    """The rows `evaluate` reads: the health figures' bank in --data's train split (also kNN's on --data's
    labels), and --eval-data's kNN bank in its train split (None without --eval-data); int64 row arrays."""
    bank = knn_bank_rows(data, cfg.knn_bank, cfg.seed)
    knn_bank = knn_bank_rows(labels.data, cfg.knn_bank, cfg.seed) if labels is not None and labels.external else None
    return bank, knn_bank


def _new_run(cfg: PretrainConfig, accelerator, inputs: Inputs, steps_per_epoch: int, fresh: bool) -> RunState:
    """A fresh `RunState` (train/state.py build_run) with the probe for the labels' classes, fp16's loss scale
    from Accelerate, and --init's backbone; says which --init it starts from on a `fresh` run."""
    labels = inputs.labels
    classes = len(labels.classes) if labels is not None else 0  # 0: no probe
    multilabel = labels is not None and labels.multilabel
    # SyncBatchNorm runs on GPUs only; CPU processes keep per-process BN statistics.
    sync_bn = accelerator.num_processes > 1 and accelerator.device.type == "cuda"
    run = build_run(cfg, accelerator.device, steps_per_epoch, classes, multilabel, sync_bn, backbone=inputs.start)
    run.scaler = accelerator.scaler  # fp16's loss scale, None otherwise
    if inputs.started is not None and fresh:
        accelerator.print(
            f"backbone from --init {inputs.started['init']} (weights sha256 {inputs.started['sha256'][:12]})"
        )
    return run


def _prepared(cfg: PretrainConfig, accelerator, run: RunState, labels: LabelSource | None):
    """The model compiled (--compile, --compile-mode) and prepared by Accelerate with its optimizer, and
    --eval-data's probe stream (None without it): (model, optimizer, side)."""
    compiled = accelerator.device.type == "cuda" if cfg.compile is None else cfg.compile  # by default on CUDA
    model = compile_model(run.model, compiled, cfg.compile_mode)
    model, optimizer = accelerator.prepare(model, run.optimizer)
    return model, optimizer, _probe_stream(cfg, labels, run, accelerator)


def _probe_stream(cfg: PretrainConfig, labels: LabelSource | None, run: RunState, accelerator) -> ProbeStream | None:
    """--eval-data: the probe trains on its train split, a side stream with its own small loader, positioned at
    the run's step. None without --eval-data (the probe, if any, learns from --data's labels in the step)."""
    if labels is None or not labels.external:
        return None
    world = accelerator.num_processes
    per_process = max(MIN_PROBE_BATCH, min(cfg.probe_batch // world, len(labels.data.indices("train")) // world))
    probe_loader = build_loader(
        labels.location,
        shard_settings(
            cfg,
            accelerator,
            split="train",
            batch_size=per_process,
            recipe=EVAL_RECIPE,
            views=1,
            drop_last=True,
            workers=1,
        ),
        backend="native",
        cache=cfg.cache,
    )
    side = ProbeStream(probe_loader, run.probe, run.model, accelerator.autocast)
    side.start(run.position.step)
    return side


def _open_outputs(cfg, accelerator, inputs: Inputs, precision: str, parts: list[dict], resumed_at: int | None) -> dict:
    """Readies --out on the main process: metrics.jsonl emptied (a fresh run) or cut at `resumed_at`, the
    checkpoint's step; config.json; the trackers. Returns the resolved settings the trackers and train.log record."""
    out = Path(cfg.out)
    resolved = {
        **cfg.to_dict(),
        "mixed_precision": precision,
        "world_size": accelerator.num_processes,
        "nodes": inputs.nodes,
        "data_digest": inputs.digest,
        "eval_data_digest": inputs.eval_digest,
    }
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        metrics = out / "metrics.jsonl"
        if resumed_at is None:
            metrics.unlink(missing_ok=True)  # the lines of a run killed before its first checkpoint: none holds them
        else:
            trim_metrics(metrics, resumed_at)
        write_config(cfg, parts)
        if accelerator.log_with:
            accelerator.init_trackers(
                "twinray",
                config=resolved,
                init_kwargs={"wandb": {"dir": str(out)}, "mlflow": {"logging_dir": str(out / "mlruns")}},
            )
    return resolved


def _start_log(cfg, accelerator, inputs: Inputs, precision: str, resolved: dict, where: str | None, changes: dict,
               command: str) -> runlog.RunLog:  # fmt: skip
    """train.log (train/runlog.py RunLog; the main process' only): the command, the device, the resolved settings,
    `where` a resumed run goes on from (None: a fresh run), and each setting changed since the checkpoint."""
    log_file = runlog.RunLog(Path(cfg.out) / "train.log" if accelerator.is_main_process else None)
    device = _device_line(accelerator.device, accelerator.num_processes, inputs.nodes, precision)
    log_file.start(command, device, resolved, where)
    for name, (old, new) in changes.items():
        log_file.line(f"changed since the checkpoint: {name} {old!r} -> {new!r}")
    return log_file


def step_row(meter: StepMeter, pos: Position, scheduler, cuda: bool) -> dict:
    """metrics.jsonl's line for a logged step: its step and epoch, the last step's figures (floats: loss, the
    method's terms, the probe's), the lr, the window's throughput (`StepMeter.window`, which starts the next
    window) and the peak memory in MiB. Settles the meter first: a NonFiniteLoss raised there stops the run before
    anything is logged or saved."""
    meter.settle()
    return {
        "step": pos.step,
        "epoch": pos.epoch,
        **meter.last,
        "lr": scheduler.get_last_lr()[0],
        **meter.window(),
        "peak_memory_mb": _peak_memory_mb(cuda),
    }


def epoch_line(row: dict, cfg: PretrainConfig, epoch: int) -> str:
    """The epoch's line on stdout and in train.log: its mean loss and the probe, kNN and health figures of `row`."""
    score = " ".join(
        f"{k} {v:.3f}" for k, v in row.items() if k.startswith(("probe_acc", "knn", "rankme", "emb_std", "corr_"))
    )
    return f"epoch {epoch}/{cfg.epochs}  mean loss {row.get('loss', float('nan')):.2f}  {score}"


def _notes(loader, labels: LabelSource | None, log_file: runlog.RunLog) -> list[tuple[str, runlog.RunLog | None]]:
    """The lines said once, with a launch's first epoch line, as (text, the RunLog that also gets it, or None):
    where the loader's cache went (stdout only), and where the labels come from (unlabeled data or --eval-data)."""
    labels_note = NO_LABELS if labels is None else labels.describe() if labels.external else None
    return [(note, to) for note, to in ((loader.cache_note, None), (labels_note, log_file)) if note]


def _say(text: str, accelerator, log_file: runlog.RunLog | None) -> None:
    """A line on the main process' stdout, and in train.log unless `log_file` is None."""
    accelerator.print(text)
    if log_file is not None:
        log_file.line(text)


def _train(cfg: PretrainConfig, accelerator, precision: str, allow_change, force: bool, command: str) -> dict:
    # ---- setup: processes, data ---------------------------------------------------------------------------------
    out, world, cuda = Path(cfg.out), accelerator.num_processes, accelerator.device.type == "cuda"
    inputs = _inputs(cfg, accelerator, precision)  # the data, its labels, --init, the recipe; this launch's part
    labels = inputs.labels

    # ---- what --out holds: resume only the same data and settings; nothing there has changed yet --------------
    saved, parts, changes = plan(cfg, inputs.part, allow_change, force)
    ended = _nothing_to_do(cfg, saved) if saved is not None else None
    if ended:
        accelerator.print(ended[0])
        return ended[1]
    loader = _train_loader(cfg, accelerator, inputs.recipe)
    steps_per_epoch = len(loader)
    bank, knn_bank = _banks(cfg, loader.data, labels)
    run = _new_run(cfg, accelerator, inputs, steps_per_epoch, fresh=saved is None)

    # ---- resume: everything, including where in the epoch the data stopped; or --force's fresh start ----------
    if force and accelerator.is_main_process and out.is_dir() and (gone := discard(out)):
        accelerator.print(f"--force: discarded {', '.join(gone)} from {out}; starting over")
    if saved is not None:
        resume(run, cfg, saved, changes, accelerator, steps_per_epoch)
    pos = run.position
    model, optimizer, side = _prepared(cfg, accelerator, run, labels)  # compiled, prepared; --eval-data's stream
    probe = run.probe if side is None else None  # on --data's labels, if any; else the side stream's
    each_step = dict(accelerator=accelerator, scheduler=run.scheduler, probe=probe, side=side)  # the same every step
    resolved = _open_outputs(cfg, accelerator, inputs, precision, parts, pos.step if saved else None)
    where = f"{saved['name']}: epoch {pos.epoch}, step {pos.in_epoch} of {steps_per_epoch}" if saved else None
    log_file = _start_log(cfg, accelerator, inputs, precision, resolved, where, changes, command)
    stop, vote, meter, summary = _stop_on_signals(), StopVote(), StepMeter(), {}  # vote: all ranks stop together

    # ---- the loop ---------------------------------------------------------------------------------------------
    model.train()
    stopped = None  # why the run stops early: a signal's name or "max_steps"
    notes = _notes(loader, labels, log_file)  # said once, with this launch's first epoch line
    while pos.epoch < cfg.epochs and not stopped:
        loader.set_epoch(pos.epoch, start_step=pos.in_epoch)
        meter.new_epoch()
        desc = f"epoch {pos.epoch + 1}/{cfg.epochs}"  # tqdm on a terminal, whole lines in a log file
        bar = runlog.progress(steps_per_epoch, pos.in_epoch, desc, disable=not accelerator.is_main_process)
        for batch in meter.batches(loader, bar):  # push() moves the bar; it closes with the epoch, on errors too
            # -- the step: the method's loss, backward, update (accumulated), the lr schedule, the online probe
            figures = train_step(model, run.method, batch.views, optimizer, labels=batch.labels, **each_step)
            # -- the loss: this step's figures are held and the previous step's read, while the device works
            meter.push(figures, images=batch.views[0].shape[0] * world, step=pos.step, epoch=pos.epoch)
            pos.step, pos.in_epoch = pos.step + 1, pos.in_epoch + 1
            # -- metrics.jsonl every log_every steps and at the epoch's end
            if pos.step % cfg.log_every == 0 or pos.in_epoch == steps_per_epoch:
                row = step_row(meter, pos, run.scheduler, cuda)  # a non-finite loss stops the run here
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
        summary = {"step": pos.step, "epoch": pos.epoch - 1, "epoch_end": True, **meter.epoch_means()}
        if pos.epoch % cfg.eval_every == 0 or pos.epoch == cfg.epochs:
            summary.update(evaluate(model, cfg, accelerator, bank, labels, knn_bank))
        log(summary, accelerator, out / "metrics.jsonl")
        save(run, cfg, accelerator, parts)  # before the epoch line: a reader that has left (`| head`) costs no work
        for note, logged_in in notes:  # where the cache went, where the labels come from
            _say(note, accelerator, logged_in)
        notes = []
        _say(epoch_line(summary, cfg, pos.epoch), accelerator, log_file)

    # ---- the run's end: a checkpoint to continue from, or the backbone ----------------------------------------
    for held in (loader, side, vote):  # the loader's decode pool and open epoch, the side stream, the vote end now
        if held is not None:
            held.close()
    return _finish(run, cfg, accelerator, parts, stopped, log_file, loader.data.manifest) or summary


def _finish(run, cfg, accelerator, parts, stopped: str | None, log_file, manifest: dict) -> dict | None:
    """The run's end: a checkpoint to continue from and {"stopped", "step"} after an early stop; otherwise the
    backbone (`export_backbone`) and None. Then curves.png and the trackers' end."""
    out, pos = Path(cfg.out), run.position
    summary = None
    if stopped:
        save(run, cfg, accelerator, parts)
        again = "re-run with a larger --max-steps, or without it," if stopped == "max_steps" else "re-run"
        _say(f"stopped ({stopped}) at step {pos.step}; checkpoint saved, {again} to continue", accelerator, log_file)
        summary = {"stopped": stopped, "step": pos.step}
    elif accelerator.is_main_process:
        export_backbone(run.model, cfg, out, parts, manifest)
        said = f"done: {pos.epoch} epochs, {pos.step} steps; backbone written to {out / 'backbone.safetensors'}"
        _say(said, accelerator, log_file)
    if accelerator.is_main_process:
        runlog.draw_curves(out / "metrics.jsonl", out / "curves.png")  # with or without a tracker
    accelerator.end_training()
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = from_args(argv)
        command = runlog.command_line(argv, program("pretrain", "twinray.train.pretrain"))
        train(cfg, parse_allow_change(args.allow_change), force=args.force, command=command)
    except (ConfigError, InputError, ValueError) as e:
        say_error("pretrain", str(e))
        return 2
    except NonFiniteLoss as e:  # exit 1: the data and flags were fine, the run diverged
        say_error("pretrain", f"{e}; the last good checkpoint is kept in {cfg.out}")
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
