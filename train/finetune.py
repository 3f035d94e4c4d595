"""Fine-tune or linear-probe a backbone on a packed dataset, with a label fraction, and report test metrics.

    python train/finetune.py --data DIR --init RUN_DIR|BACKBONE.safetensors|imagenet|random \\
        --mode full|linear|freeze:K --fraction F --seed S --epochs E --size S --out DIR

Defaults are the study's downstream settings: Adam, lr 0.00153, weight decay 9.87e-6, batch 96, 15 epochs,
horizontal flip. The train split is cut to a stratified label fraction (nested across fractions for one seed). The
epoch with the best val score (accuracy, or mean AUROC for multilabel data) is kept; only then is the test split
read, once. Writes results.json (config, history, best val, `"test"` metrics), model.safetensors + model.json,
confusion.png (multiclass) and train.log (the command, versions, config and each epoch's line; appended on a
resume: train/runlog.py). Every flag is a field of FinetuneConfig (train/config.py): `--config FILE.yaml` sets
fields first, and flags win.

An --out that holds a finished run (results.json) with the same settings is left as it is (one line, exit 0); with
other settings it is one line naming each one that differs, exit 2. `--force` replaces it. An unfinished run there
resumes after its last epoch if its settings match. The data is compared by content (the sha256 of its
manifest.json), not by path. One finetune at a time writes to an --out (a lock beside it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from twinray import lock
from twinray.atomic import write_json
from twinray.cli import InputError, run_cli
from twinray.pipelines import LoaderSettings, build_loader
from twinray.pipelines.augment import EVAL_RECIPE, FINETUNE_RECIPE
from twinray.prep.datasets.chexpert import COMPETITION  # used by default when the dataset has them all
from twinray.prep.format import PackedDataset
from twinray.prep.open_dataset import open_dataset
from twinray.prep.shard_cache import CacheSettings
from twinray.train import checkpoint, preprocessing, runlog, transfer
from twinray.train.config import FinetuneConfig, from_args
from twinray.train.label_fractions import label_fraction
from twinray.train.labels import policy_targets, targets_bce
from twinray.train.metrics import draw_confusion, multiclass_metrics, multilabel_metrics
from twinray.train.model import Classifier
from twinray.train.resume import latest_checkpoint
from twinray.usage import program

# A run directory resumes only a run with the same settings; --epochs may grow, and the device or backend may change.
# "data" is compared by content: the sha256 of the dataset's manifest.json (which lists every shard's sha256).
RESUME_MUST_MATCH = ("data", "init", "mode", "fraction", "seed", "size", "batch_size", "lr", "weight_decay",
                     "backbone", "channels", "labels", "uncertain")  # fmt: skip
# A finished run is the one asked for only if it also ran as many epochs.
FINISHED_MUST_MATCH = (*RESUME_MUST_MATCH, "epochs")
# What a run writes into --out; `--force` removes these (and the checkpoints) before it starts.
OUTPUTS = ("results.json", "model.safetensors", "model.json", "confusion.png")


class Task:
    """What the dataset asks for: its classes or labels, the loss, the metrics and the selection score."""

    def __init__(self, data: PackedDataset, labels: str | None, uncertain: str):
        self.multilabel = data.task == "multilabel"
        if not self.multilabel:
            self.names, self.columns = list(data.classes), []
        else:
            wanted = (
                labels.split(",")
                if labels
                else (COMPETITION if set(COMPETITION) <= set(data.classes) else data.classes)
            )
            unknown = [w for w in wanted if w not in data.classes]
            if unknown:
                raise InputError(f"--labels: {', '.join(unknown)} not among {', '.join(data.classes)}")
            self.names, self.columns = list(wanted), [data.classes.index(w) for w in wanted]
        self.uncertain = uncertain

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        return policy_targets(labels, self.columns, self.uncertain) if self.multilabel else labels.long()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.multilabel:
            return F.cross_entropy(logits.float(), targets)
        return targets_bce(logits, targets)

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict:
        if self.multilabel:
            return multilabel_metrics(logits, targets, self.names)
        return multiclass_metrics(logits, targets, self.names)

    def score(self, metrics: dict) -> float:
        """The model-selection score on val."""
        value = metrics["mean_auroc"] if self.multilabel else metrics["accuracy"]
        return -1.0 if value is None else value


def parse_args(argv: list[str] | None) -> FinetuneConfig:
    """The run's FinetuneConfig from flags and an optional `--config` YAML (train/config.py); the device defaults to
    cuda when there is one. Raises ConfigError naming the flag for a bad value."""
    cfg, _ = from_args(argv, FinetuneConfig, description=__doc__)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    CacheSettings.from_args(cfg)  # a bad --shard-cache-limit or --storage-options is one line here
    return cfg


def _loader(args, split: str, rows=None, train: bool = False, cache: str = "none"):
    """`cache`: for the loaders read every epoch (fine-tuning's train, val); the others are read once."""
    return build_loader(
        args.data,
        LoaderSettings(
            split=split,
            batch_size=args.batch_size,
            device=args.device,
            recipe=FINETUNE_RECIPE if train else EVAL_RECIPE,
            size=args.size,
            views=1,
            seed=args.seed,
            drop_last=train and len(rows) > args.batch_size,  # a 1% fraction may hold less than one batch
            workers=args.workers,
            rows=rows,
            shard_cache=CacheSettings.from_args(args),
        ),
        backend=args.backend,
        cache=cache,
    )


@torch.no_grad()
def predict(model: nn.Module, loader, task: Task, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (logits, or features for a backbone) and targets of every image the loader yields, in eval mode."""
    model.eval()
    logits, targets = [], []
    for batch in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(model(batch.views[0]).float().cpu())
        targets.append(task.targets(batch.labels.cpu()))
    return torch.cat(logits), torch.cat(targets)


def differences(before: dict, now: dict, names: tuple[str, ...]) -> list[str]:
    """Says "NAME was OLD, now NEW" for each setting in `names` that differs between two runs' records
    ({"config": FinetuneConfig fields, "data_sha256": the manifest's sha256}). The data is compared by its sha256;
    a record from before the sha256 was kept falls back to the path."""
    said = []
    for name in names:
        old, new = before["config"].get(name), now["config"][name]
        if name == "data" and before.get("data_sha256"):
            if before["data_sha256"] != now["data_sha256"]:
                said.append(f"data was {old} (manifest sha256 {before['data_sha256'][:12]}), "
                            f"now {new} (manifest sha256 {now['data_sha256'][:12]})")  # fmt: skip
        elif old != new:
            said.append(f"{name} was {old!r}, now {new!r}")
    return said


def finished(out: Path, now: dict) -> dict:
    """The results of the finished run in `out` when its settings are `now`'s (a record as in `differences`).
    Raises InputError naming every setting that differs, or an unreadable results.json."""
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
        changed = differences(results, now, FINISHED_MUST_MATCH)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a finetune results file ({type(e).__name__}); use another --out") from None
    if changed:
        raise InputError(
            f"--out {out} holds a finished run with other settings: {'; '.join(changed)}; use another --out, or "
            "--force to replace it"
        )
    return results


def run(args: FinetuneConfig, command: str | None = None) -> dict:
    """Trains, selects on val, tests once and writes --out (the module's docstring); returns results.json's dict.
    `command`: the command line train.log records (default: sys.argv). Raises InputError (one line) for bad data,
    an --out holding another run, or an --out another finetune writes."""
    command = command or runlog.command_line(None, program("finetune", "twinray.train.finetune"))
    with lock.exclusive(args.out, "fine-tuning"), contextlib.ExitStack() as loaders:  # loader threads end here
        return _run(args, loaders, command)


def _build(args: FinetuneConfig, data: PackedDataset, task: Task, device: torch.device):
    """The classifier (--init's backbone, `transfer.freeze`'s --mode, a fine-tuned init's head matched by class
    name) on `device` in channels_last, and Adam over its trainable parameters: (model, frozen modules, init's
    record, optimizer). Raises InputError/ValueError for an --init that cannot be read."""
    backbone, init = transfer.load_backbone(args.init, args.backbone, args.channels, args.output_stride)
    preprocessing.warn("finetune", preprocessing.of_init(init), data.manifest, args.data)  # one line, if any
    frozen = transfer.freeze(backbone, args.mode)
    model = Classifier(backbone, len(task.names), init["in_chans"])
    head = transfer.classifier_head(init, task.names, data.task)  # a fine-tuned init's head, matched by class name
    if head is not None:
        model.head.load_state_dict(head)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(transfer.trainable_parameters(model), lr=args.lr, weight_decay=args.weight_decay)
    return model, frozen, init, optimizer


@dataclass
class Feed:
    """What an epoch trains on and is scored with. `forward`: the module the step runs (the whole model, or the
    head alone for a linear probe); `batches(epoch)`: the epoch's (inputs, targets) on the device; `val()`:
    (outputs, targets) of the val split, in eval mode; `notes`: where each cached split went, said once."""

    forward: nn.Module
    batches: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    val: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    notes: list[str]


def _feed(args: FinetuneConfig, model: Classifier, task: Task, rows, loaders: contextlib.ExitStack) -> Feed:
    """The loaders (entered in `loaders`, so their threads end with the run) and the Feed of --mode: a linear
    probe trains the head on the backbone's features of unaugmented images, computed once; any other mode runs the
    model on augmented batches each epoch."""
    device, linear = torch.device(args.device), transfer.parse_mode(args.mode)[0] == "linear"
    val_loader = loaders.enter_context(_loader(args, "val", cache="none" if linear else args.cache))  # linear: once
    read_each_epoch = [val_loader]
    if linear:
        # The backbone is a fixed function here: its features (of unaugmented images) are computed once, and the
        # head trains on them; a probe of the features themselves, and far cheaper than a forward pass per epoch.
        train_x, train_y = predict(model.backbone, loaders.enter_context(_loader(args, "train", rows)), task, device)
        val_x, val_y = predict(model.backbone, val_loader, task, device)

        def train_batches(epoch: int):
            order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            for k in range(0, len(order), args.batch_size):
                take = order[k : k + args.batch_size]
                if len(take) > 1:  # BatchNorm needs two samples
                    yield train_x[take].to(device), train_y[take].to(device)

        def val_outputs():
            model.head.eval()
            with torch.no_grad():
                return model.head(val_x.to(device)).float().cpu(), val_y

        forward = model.head
    else:
        train_loader = loaders.enter_context(_loader(args, "train", rows, train=True, cache=args.cache))
        read_each_epoch.append(train_loader)

        def train_batches(epoch: int):
            train_loader.set_epoch(epoch)
            for batch in train_loader:
                yield batch.views[0], task.targets(batch.labels)

        def val_outputs():
            return predict(model, val_loader, task, device)

        forward = model
    notes = [loader.cache_note for loader in read_each_epoch if loader.cache_note]
    return Feed(forward, train_batches, val_outputs, notes)


def _discard(out: Path) -> None:
    """--force: removes OUTPUTS, results.json first (without it, what is left is no longer a finished run), then
    the checkpoints (train/resume.py says how pretrain's --force differs)."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    for old in out.glob(f"{checkpoint.PREFIX}*"):
        shutil.rmtree(old)


def _resume(saved: dict, record: dict, out: Path, model: nn.Module, optimizer) -> tuple[list[dict], dict]:
    """Puts a run killed part-way back after its last finished epoch: the model and optimizer of checkpoint `saved`
    (train/resume.py latest_checkpoint); returns its (history, best). Raises InputError naming each setting of
    RESUME_MUST_MATCH that differs from `record`'s."""
    changed = differences(saved, record, RESUME_MUST_MATCH)
    if changed:
        raise InputError(
            f"--out {out} holds an unfinished run with other settings: {'; '.join(changed)}; use another --out, "
            "or --force to start it over"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    print(f"resuming {out} after epoch {len(saved['history'])}")
    return saved["history"], saved["best"]


def step(forward: nn.Module, task: Task, optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One supervised step: `forward(inputs)` (B x C x S x S images, or B x F features for a linear probe) under
    bf16 autocast on CUDA, the task's loss on `targets` (class indices, or the multilabel policy's targets),
    backward, the update. Returns the loss, a detached 0-dim float32 device tensor, unread (a read waits for the
    device)."""
    device = inputs.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = forward(inputs)
    loss = task.loss(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def epoch_loss(losses: list[torch.Tensor], epoch: int) -> float:
    """The mean of an epoch's step losses (0-dim tensors; read here, once per epoch), rounded to 6 places; 0.0 for
    an epoch without a step. Raises FloatingPointError, naming the epoch (0-based `epoch`, said 1-based), for a
    non-finite loss: checked before the epoch is scored or saved."""
    step_losses = torch.stack(losses).float().cpu() if losses else torch.zeros(1)
    if not torch.isfinite(step_losses).all():
        bad = step_losses[~torch.isfinite(step_losses)][0].item()
        raise FloatingPointError(f"epoch {epoch + 1}: the loss is {bad}; try a lower --lr")
    return round(step_losses.mean().item(), 6)


def _run(args: FinetuneConfig, loaders: contextlib.ExitStack, command: str) -> dict:
    # ---- setup: what --out holds (a finished run is kept), the data, the model ----------------------------------
    device, out = torch.device(args.device), Path(args.out)
    data = open_dataset(args.data, CacheSettings.from_args(args))
    record = {"config": args.to_dict(), "data_sha256": data.digest}
    if (out / "results.json").is_file() and not args.force:
        results = finished(out, record)
        print(f"--out {out} already holds this finished run: {out / 'results.json'} (--force runs it again)")
        return results
    task = Task(data, args.labels, args.uncertain)
    torch.manual_seed(args.seed)
    model, frozen, init, optimizer = _build(args, data, task, device)
    split_rows = data.indices("train")
    rows = label_fraction(split_rows, data.labels(split_rows), args.fraction, args.seed)
    feed = _feed(args, model, task, rows, loaders)

    # ---- resume: after the last finished epoch, or --force's fresh start (train/resume.py) --------------------
    out.mkdir(parents=True, exist_ok=True)
    if args.force:
        _discard(out)
    saved = latest_checkpoint(out, args.force)
    history, best = _resume(saved, record, out, model, optimizer) if saved is not None else ([], None)
    log = runlog.RunLog(out / "train.log")  # appended after a separator on a resume, else a new one
    resumed = f"{saved['name']}: after epoch {len(history)}" if saved is not None else None
    log.start(command, str(device), {**record["config"], "data_sha256": data.digest}, resumed)

    # ---- the loop: an epoch of steps, val, the best epoch so far, a checkpoint -------------------------------
    notes = feed.notes
    for epoch in range(len(history), args.epochs):
        model.train()
        transfer.keep_frozen_in_eval(frozen)
        start, losses = time.perf_counter(), []
        for inputs, targets in feed.batches(epoch):
            losses.append(step(feed.forward, task, optimizer, inputs, targets))  # read once, at the epoch's end
        train_loss = epoch_loss(losses, epoch)  # a non-finite loss stops the run here, before anything is saved
        val = task.metrics(*feed.val())
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_score": task.score(val),
               "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
        history.append(row)
        if best is None or row["val_score"] > best["score"]:  # selection reads val only
            state = copy.deepcopy(model.state_dict())
            best = {"score": row["val_score"], "epoch": epoch + 1, "val": val, "state": state}
        state = {**record, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        checkpoint.save(out, epoch + 1, {**state, "history": history, "best": best}, keep=1)
        for note in notes:  # where each split's cache went; after the save, like every line
            print(note)
        notes = []
        said = f"epoch {epoch + 1}/{args.epochs}  train_loss {row['train_loss']:.4f}  val {row['val_score']:.4f}"
        print(said)
        log.line(said)

    # ---- the end: the best epoch's weights, the test split read once, the outputs -----------------------------
    model.load_state_dict(best["state"])
    test = task.metrics(*predict(model, loaders.enter_context(_loader(args, "test")), task, device))
    results = _results(record, data, init, task, len(rows), len(split_rows), history, best, test)
    _write_outputs(out, model, results, init, data, args.size)
    summary = (
        f"accuracy {test['accuracy']:.4f}  macro_f1 {test['macro_f1']:.4f}"
        if not task.multilabel
        else f"mean_auroc {test['mean_auroc']}"
    )
    said = f"test ({test['n']} images, best val epoch {best['epoch']}): {summary}  -> {out / 'results.json'}"
    print(said)
    log.line(said)
    return results


def _results(record, data, init, task, train_samples, split_samples, history, best, test) -> dict:
    """results.json's content: the config, the data's sha256, --init's record, the task and classes, the train
    counts, each epoch's row, the best val epoch and its metrics, and the test metrics."""
    return {
        "config": record["config"],
        "data_sha256": data.digest,  # what identifies the data: the sha256 of its manifest.json
        "init": init,
        "task": "multilabel" if task.multilabel else "multiclass",
        "classes": task.names,
        "train_samples": train_samples,
        "train_split_samples": split_samples,
        "history": history,
        "best_epoch": best["epoch"],
        "val": best["val"],
        "test": test,
    }


def _write_outputs(out: Path, model: nn.Module, results: dict, init: dict, data: PackedDataset, size: int) -> None:
    """model.safetensors, model.json, confusion.png (multiclass), then results.json, whose presence means the run
    finished; then the checkpoint, which has served, is removed."""
    checkpoint.save_weights(out / "model.safetensors", model)
    model_info = {**init, "classes": results["classes"], "size": size, "task": results["task"],
                  "dataset": data.manifest.get("dataset"), "data_digest": data.digest,
                  "preprocessing": preprocessing.record(data.manifest, size, init["in_chans"])}  # fmt: skip
    write_json(out / "model.json", model_info)
    if results["task"] == "multiclass":
        draw_confusion(results["test"]["confusion"], out / "confusion.png", title=f"test, {init['init']}")
    write_json(out / "results.json", results)  # its presence means the run finished
    for done in out.glob(f"{checkpoint.PREFIX}*"):  # finished: the checkpoint has served (and is large)
        shutil.rmtree(done, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv), command=runlog.command_line(argv, program("finetune", "twinray.train.finetune")))
    return 0


if __name__ == "__main__":
    run_cli(main, prog="finetune", errors=(ValueError, FloatingPointError))
