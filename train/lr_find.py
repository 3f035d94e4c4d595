"""LR range test (the study's figure 6): raise the learning rate exponentially over a few hundred steps, record the
smoothed loss, and suggest the lr where it falls fastest.

    python train/lr_find.py --data data/packed/covid --task pretrain --out lr-pretrain.png
    python train/lr_find.py --data data/packed/covid --task finetune --out lr-finetune.png

`pretrain` uses the Barlow Twins loss on two seed-final views; `finetune` uses cross-entropy (masked BCE for
multilabel data) of a ResNet-18 with a linear head on horizontally flipped crops. Writes the PNG and a JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from twinray.cli import OneLineParser, run_cli, say_error
from twinray.pipelines import LoaderSettings, build_loader
from twinray.prep import shard_cache
from twinray.prep.shard_cache import CacheSettings
from twinray.storage import location
from twinray.train.config import ConfigError, check_batch_size
from twinray.train.labels import certain_bce
from twinray.train.methods.barlow import BarlowTwinsMethod
from twinray.train.model import BarlowTwins
from twinray.train.step import train_step
from twinray.usage import examples, program


def suggest(lrs: list[float], losses: list[float]) -> float:
    """The lr where the smoothed loss falls fastest against log(lr) (fastai's steepest-slope rule)."""
    # The first tenth is the running mean warming up, not the loss responding to the lr: skip it.
    first = max(1, len(lrs) // 10)
    if len(lrs) - first < 2:
        return lrs[len(lrs) // 2]
    slopes = {
        i: (losses[i + 1] - losses[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
        for i in range(first, len(lrs) - 1)
    }
    return lrs[min(slopes, key=slopes.get)]


def range_test(update, optimizer, min_lr: float, max_lr: float, steps: int, smooth: float = 0.98):
    """Runs `update()` (one training step on the next batch, returning its loss as a tensor or float) at
    exponentially rising lrs, set in `optimizer`'s groups; stops when the loss explodes."""
    lrs, losses, avg, best = [], [], 0.0, math.inf
    for k in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (k / max(1, steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        value = float(update())
        if not math.isfinite(value):
            break
        avg = smooth * avg + (1 - smooth) * value
        smoothed = avg / (1 - smooth ** (k + 1))  # bias-corrected running mean
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if smoothed > 4 * best and k > 10:
            break
    return lrs, losses


def plot(lrs, losses, lr_suggested: float, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(lrs, losses)
    ax.axvline(lr_suggested, color="tab:red", linestyle="--", label=f"suggested lr {lr_suggested:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("smoothed loss")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    prog = program("lr-find", "twinray.train.lr_find")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "--data data/packed/covid --task pretrain --out lr-pretrain.png",
            "--data data/packed/covid --task finetune --out lr-finetune.png --steps 200",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, type=location, help="a packed dataset or its URL (required)")
    shard_cache.add_arguments(parser)  # --shard-cache, ...: for a --data URL
    parser.add_argument(
        "--task",
        choices=["pretrain", "finetune"],
        default="pretrain",
        help="whose loss: Barlow Twins pretraining or fine-tuning (default: %(default)s; choices: %(choices)s)",
    )
    parser.add_argument("--out", required=True, type=Path, help="the plot (.png); the JSON goes beside it (required)")
    parser.add_argument("--min-lr", type=float, default=1e-7, help="the first step's lr (default: %(default)s)")
    parser.add_argument("--max-lr", type=float, default=1.0, help="the last step's lr (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="steps from --min-lr to --max-lr (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    parser.add_argument("--size", type=int, default=224, help="the side of the square input, px (default: %(default)s)")
    parser.add_argument("--device", default=None, help="the torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the data (default: %(default)s)")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_batch_size(args.batch_size)  # BatchNorm trains on the batch: one image cannot
    except ConfigError as e:
        parser.error(str(e))
    if not 0 < args.min_lr < args.max_lr:
        say_error("lr_find", f"need 0 < --min-lr ({args.min_lr}) < --max-lr ({args.max_lr})")
        return 2
    torch.manual_seed(args.seed)
    recipe = "seed-final" if args.task == "pretrain" else "base"
    loader = build_loader(
        str(args.data),
        LoaderSettings(
            split="train",
            batch_size=args.batch_size,
            device=args.device,
            recipe=recipe,
            size=args.size,
            views=2 if args.task == "pretrain" else 1,
            seed=args.seed,
            shard_cache=CacheSettings.from_args(args),
        ),
    )
    if len(loader) == 0:  # cycling empty epochs would never end
        loader.close()
        say_error(
            "lr_find", f"--batch-size {args.batch_size} is larger than the train split ({len(loader.rows)} images)"
        )
        return 2
    model = BarlowTwins().to(args.device, memory_format=torch.channels_last)
    multilabel = loader.data.task == "multilabel"
    head = torch.nn.Linear(model.backbone.num_features, len(loader.data.classes)).to(args.device)
    params = list(model.parameters()) + (list(head.parameters()) if args.task == "finetune" else [])
    optimizer = torch.optim.Adam(params, lr=args.min_lr)
    batches = (b for epoch in range(10**6) for b in (loader.set_epoch(epoch) or loader))

    def step_loss() -> torch.Tensor:  # finetune's loss on the next batch
        batch = next(batches)
        logits = head(model.backbone(batch.views[0]))
        if multilabel:
            return certain_bce(logits, batch.labels)  # 0, not NaN, for a batch with no certain label
        return F.cross_entropy(logits, batch.labels)

    method = BarlowTwinsMethod()

    def update() -> torch.Tensor:
        """One training step at the lr range_test has set; returns its loss."""
        if args.task == "pretrain":  # the trainer's own step (train/step.py)
            return train_step(model, method, next(batches).views, optimizer)["loss"]
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    lrs, losses = range_test(update, optimizer, args.min_lr, args.max_lr, args.steps)
    batches.close()
    loader.close()  # its threads end now (pipelines/loader.py)
    if not lrs:
        say_error("lr_find", "the loss was not finite at the first step")
        return 1
    lr = suggest(lrs, losses)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(
        lrs, losses, lr, f"LR range test: {args.task} ({'Barlow Twins' if args.task == 'pretrain' else 'CE'})", args.out
    )
    result = {"task": args.task, "suggested_lr": lr, "lrs": lrs, "losses": losses, "data": str(args.data)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"suggested lr {lr:.2e}; wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="lr_find", errors=(ValueError,))
