"""`twinray export RUN --format timm|onnx --out DIR`: a finished run's model as a folder others can load.

RUN is a finished pretraining run (its backbone.safetensors and backbone.json) or a finished fine-tuning run (its
model.safetensors, model.json with the class names, results.json). Either becomes a timm model: the backbone with
`num_classes=0` (pooled features, N x num_features), or the fine-tuned classifier with its head folded into timm's
own classifier (N x classes logits).

timm   DIR is a Hugging Face Hub model repository, laid out as timm's `push_to_hub` writes one: `model.safetensors`
       (timm's names), `config.json` (`architecture`, `num_classes`, `num_features`, `global_pool`, `model_args`
       {"in_chans", and "output_stride" where the run's is not 32}, `label_names` for a classifier, and
       `pretrained_cfg`: `input_size` [C, S, S], `mean`, `std`, `interpolation`, `crop_pct` 1, `num_classes`) and a
       model card, README.md. It loads without network with `timm.create_model("local-dir:DIR", pretrained=True)`
       (a recent timm: it passes `model_args` on), or in any timm with `timm.create_model(ARCH, pretrained=True,
       num_classes=0, in_chans=C[, output_stride=OS], pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))`
       (the same tensors load at any output stride, so leaving it out builds another network without an error);
       uploaded as it is, with
       `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`.
onnx   DIR holds model.onnx (torch's exporter, opset ONNX_OPSET, input "input" float32 N x C x S x S with a dynamic
       batch axis N, output "features" or "logits"), model.json and the model card. After writing, the export is run
       in onnxruntime on CPU (when installed: the `onnx` extra) and compared with PyTorch: the largest difference,
       relative to the largest output, must stay under ONNX_TOLERANCE, and model.json records it.

Every export records its preprocessing (train/preprocessing.py): the input range, the normalisation and the prep
settings that made the pixels; config.json holds it under "twinray", model.json under "preprocessing".

DIR is written beside itself and renamed into place when complete; a DIR that exists is kept unless --force.
A run that has not finished, or a folder that holds no run, is one line (exit 2). docs/reuse.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from twinray.atomic import naming, write_json
from twinray.cli import InputError, OneLineParser, run_cli
from twinray.train import checkpoint, transfer
from twinray.usage import examples, program

FORMATS = ("timm", "onnx")
ONNX_OPSET = 17
# The ONNX export's largest |onnxruntime - PyTorch| over the largest |PyTorch| output, on a CPU batch: float32
# kernels differ in summation order, so agreement is to a few ulps of the features' scale, far inside this.
ONNX_TOLERANCE = 1e-4
# PretrainedCfg fields kept from timm's own config of the architecture (what the model is, not where weights were).
KEPT_CFG = ("first_conv", "classifier", "min_input_size")


@dataclass
class Exportable:
    """A finished run's model as timm builds it, and what it is.

    model: timm model in eval mode; N x C x S x S float32 -> N x num_features (kind "backbone") or N x classes
        logits (kind "classifier"). info: backbone.json or model.json. config: the run's config.json or the
        finetune's results.json "config" ({} if absent). classes: the classifier's class names, else None."""

    run: Path
    kind: str
    model: nn.Module
    info: dict
    config: dict
    classes: list[str] | None

    @property
    def timm_name(self) -> str:
        return self.info["timm_name"]

    @property
    def in_chans(self) -> int:
        return int(self.info["in_chans"])

    @property
    def output_stride(self) -> int:
        return int(self.info.get("output_stride", 32))

    @property
    def size(self) -> int:
        return int(self.info["size"])

    @property
    def output(self) -> str:
        return "features" if self.kind == "backbone" else "logits"


def unfinished(run: Path) -> bool:
    """Whether `run` holds a run that started but has not finished (a config, a log or a checkpoint)."""
    return any((run / n).exists() for n in ("config.json", "train.log")) or checkpoint.latest(run) is not None


def load(run: str | Path) -> Exportable:
    """The finished run in `run` (a pretraining or fine-tuning run directory) as timm builds it. Raises InputError
    in one line for a missing folder, a run that has not finished, or a folder that holds no run."""
    run = Path(run)
    if not run.is_dir():
        raise InputError(f"{run}: no such run directory")
    if (run / "backbone.safetensors").is_file():
        return _pretrained(run)
    if (run / "model.safetensors").is_file() and (run / "results.json").is_file():
        return _finetuned(run)
    if unfinished(run):
        raise InputError(
            f"{run}: the run has not finished: no backbone.safetensors (a pretraining run writes it after its last "
            "epoch) nor a finetune's model.safetensors and results.json; re-run its command to finish it"
        )
    raise InputError(f"{run}: not a twinray run (no backbone.safetensors, nor a finetune's model.safetensors)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _pretrained(run: Path) -> Exportable:
    try:
        backbone, init = transfer.load_backbone(str(run))
    except transfer.TransferError as e:
        raise InputError(str(e).removeprefix("--init ")) from None
    info = {**_read_json(run / "backbone.json"), **{k: init[k] for k in ("timm_name", "in_chans", "output_stride")}}
    info.setdefault("size", _read_json(run / "config.json").get("size", 224))
    return Exportable(run, "backbone", backbone.eval(), info, _read_json(run / "config.json"), None)


def _finetuned(run: Path) -> Exportable:
    """The fine-tuned Classifier as one timm model: its head (BatchNorm without affine, then Linear) folded into
    timm's classifier, W' = W / sqrt(var + eps), b' = b - W' mean; the logits are the Classifier's."""
    info, results = _read_json(run / "model.json"), _read_json(run / "results.json")
    classes = info.get("classes")
    if not isinstance(classes, list) or not classes:
        raise InputError(f"{run / 'model.json'}: a fine-tuned model without its class names")
    try:
        backbone, init = transfer.load_backbone(str(run / "model.safetensors"))
    except transfer.TransferError as e:
        raise InputError(str(e).removeprefix("--init ")) from None
    import timm

    tensors = load_file(run / "model.safetensors")
    model = timm.create_model(init["timm_name"], num_classes=len(classes), **model_args(init))
    missing, unexpected = model.load_state_dict(backbone.state_dict(), strict=False)
    head = model.get_classifier()
    if unexpected or {k.rsplit(".", 1)[0] for k in missing} != {_classifier_name(model)}:
        raise InputError(f"{run / 'model.safetensors'}: its backbone does not fit timm's {init['timm_name']}")
    scale = (tensors["head.0.running_var"] + 1e-5).rsqrt()  # nn.BatchNorm1d's default eps
    with torch.no_grad():
        head.weight.copy_(tensors["head.1.weight"] * scale)
        head.bias.copy_(tensors["head.1.bias"] - head.weight @ tensors["head.0.running_mean"])
    info = {**info, **{k: init[k] for k in ("timm_name", "in_chans", "output_stride")}}
    return Exportable(run, "classifier", model.eval(), info, results.get("config", {}), list(classes))


def model_args(info: dict) -> dict:
    """timm.create_model's keyword arguments beyond the name for a backbone record (`load_backbone`'s, model.json,
    backbone.json): in_chans, and output_stride where it is not timm's default 32, as config.json's `model_args`
    holds them for timm's own loader."""
    args = {"in_chans": int(info["in_chans"])}
    if int(info.get("output_stride", 32)) != 32:
        args["output_stride"] = int(info["output_stride"])
    return args


def _classifier_name(model: nn.Module) -> str:
    return model.pretrained_cfg.get("classifier") or "fc"


# ---- timm ---------------------------------------------------------------------------------------------------------


def timm_config(source: Exportable) -> dict:
    """config.json as timm's `save_for_hf` writes it and `load_model_config_from_path` / `_from_hf` read it."""
    arch_cfg = source.model.pretrained_cfg
    prep = source.info.get("preprocessing", {})
    norm = prep.get("normalization", {"mean": [0.0] * source.in_chans, "std": [1.0] * source.in_chans})
    pretrained_cfg = {
        **{k: arch_cfg[k] for k in KEPT_CFG if arch_cfg.get(k) is not None},
        "custom_load": False,
        "input_size": [source.in_chans, source.size, source.size],
        "fixed_input_size": False,
        "interpolation": prep.get("input", {}).get("interpolation", "bicubic"),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": norm["mean"],
        "std": norm["std"],
        "num_classes": source.model.num_classes,
        "description": f"twinray {source.kind} of {source.info.get('dataset') or 'a packed dataset'}",
    }
    if source.classes:
        pretrained_cfg["label_names"] = source.classes
    config = {
        "architecture": source.timm_name,
        "num_classes": source.model.num_classes,
        "num_features": source.model.num_features,
        "global_pool": getattr(source.model, "global_pool", None) and source.model.global_pool.pool_type,
        "model_args": model_args(source.info),
        "pretrained_cfg": pretrained_cfg,
    }
    if source.classes:
        config["label_names"] = source.classes
    config["twinray"] = twinray_record(source)
    return config


def twinray_record(source: Exportable) -> dict:
    """What twinray knows of the model: its kind, output, classes, task, preprocessing and where it came from."""
    return {
        "kind": source.kind,
        "output": source.output,
        "timm_name": source.timm_name,
        "in_chans": source.in_chans,
        "output_stride": source.output_stride,
        "size": source.size,
        "classes": source.classes,
        "task": source.info.get("task"),
        "dataset": source.info.get("dataset"),
        "data_digest": source.info.get("data_digest"),
        "run": str(source.run),
        "preprocessing": source.info.get("preprocessing"),
    }


def write_timm(source: Exportable, folder: Path) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in source.model.state_dict().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    write_json(folder / "config.json", timm_config(source))


# ---- ONNX ---------------------------------------------------------------------------------------------------------


def write_onnx(source: Exportable, folder: Path) -> dict:
    """model.onnx and model.json; returns model.json's dict (with the onnxruntime check's figures)."""
    example = torch.rand(2, source.in_chans, source.size, source.size)
    kw = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        warnings.simplefilter("ignore")
        torch.onnx.export(
            source.model,
            (example,),
            str(folder / "model.onnx"),
            input_names=["input"],
            output_names=[source.output],
            dynamic_axes={"input": {0: "batch"}, source.output: {0: "batch"}},
            opset_version=ONNX_OPSET,
            **kw,
        )
    record = {
        **twinray_record(source),
        "format": "onnx",
        "opset": ONNX_OPSET,
        "input": {"name": "input", "dtype": "float32", "shape": ["batch", source.in_chans, source.size, source.size]},
        "output": {"name": source.output, "shape": ["batch", len(source.classes or []) or source.model.num_features]},
    }
    check = onnx_check(folder / "model.onnx", source)
    if check is not None:
        record["onnxruntime_check"] = check
    write_json(folder / "model.json", record)
    return record


def onnx_check(path: Path, source: Exportable, batch: int = 3) -> dict | None:
    """Runs model.onnx in onnxruntime on CPU on a random batch of another size than the export's (the batch axis
    is dynamic) and compares with PyTorch. Returns {"batch", "max_abs_diff", "relative", "tolerance"}, or None
    without onnxruntime. Raises InputError when the relative difference exceeds ONNX_TOLERANCE."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.rand(batch, source.in_chans, source.size, source.size, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        want = source.model(x)
    diff = (got - want).abs().max().item()
    relative = diff / max(want.abs().max().item(), 1e-12)
    if relative > ONNX_TOLERANCE:
        raise InputError(f"{path}: onnxruntime differs from PyTorch by {relative:.2e} of the output's scale")
    return {"batch": batch, "max_abs_diff": diff, "relative": relative, "tolerance": ONNX_TOLERANCE}


# ---- the model card -----------------------------------------------------------------------------------------------


def knn_rows(run: Path) -> list[dict]:
    """The evaluation rows of a pretraining run's metrics.jsonl: epoch and each kNN figure."""
    path, rows = run / "metrics.jsonl", []
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        knn = {k: v for k, v in row.items() if k.startswith("knn")}
        if row.get("epoch_end") and knn:
            rows.append({"epoch": row["epoch"] + 1, **knn})
    return rows


def model_card(source: Exportable, fmt: str) -> str:
    """README.md: Hugging Face's model card front matter, then what the model is, how to load it, the training
    data (name and manifest digest), method, epochs, the kNN figures and the preprocessing."""
    cfg, info = source.config, source.info
    prep = info.get("preprocessing") or {}
    name = source.run.name
    lines = [
        "---",
        "library_name: timm" if fmt == "timm" else "library_name: onnx",
        "tags:",
        *(
            f"- {t}"
            for t in (
                "image-feature-extraction" if source.kind == "backbone" else "image-classification",
                "timm",
                "twinray",
                "chest-x-ray",
            )
        ),  # fmt: skip
        "---",
        "",
        f"# {name}: {source.timm_name} {'backbone' if source.kind == 'backbone' else 'classifier'} (twinray)",
        "",
        f"A {source.timm_name} with {source.in_chans} input channel(s) at {source.size} px, "
        + (
            f"output stride {source.output_stride} (its last stages dilated, not strided: build it with "
            f"`output_stride={source.output_stride}`, which config.json's model_args holds), "
            if source.output_stride != 32
            else ""
        )
        + (
            f"self-supervised with {cfg.get('method', 'barlow')} by twinray; outputs {info.get('num_features')} "
            "pooled features (no classifier)."
            if source.kind == "backbone"
            else f"fine-tuned by twinray; outputs {len(source.classes)} logits: {', '.join(source.classes)}."
        ),
        "",
        "## Load it",
        "",
        "```python",
    ]
    if fmt == "timm":
        lines += [
            "import timm",
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)  # or "hf-hub:ORG/NAME"',
        ]
    else:
        lines += [
            "import onnxruntime",
            'session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
            f'{source.output} = session.run(None, {{"input": x}})[0]  # x: float32 N x {source.in_chans} x '
            f"{source.size} x {source.size}",
        ]
    lines += ["```", "", "## Preprocessing (feed it exactly this)", ""]
    inp = prep.get("input", {})
    norm = prep.get("normalization", {})
    lines += [
        f"- input: float32 N x {source.in_chans} x {source.size} x {source.size}, {inp.get('channels', 'grey')}, "
        f"range {inp.get('range', [0.0, 1.0])} ({inp.get('scale', 'uint8 / 255')})",
        f"- geometry: {inp.get('crop', 'centre square')}, resized to {source.size} px "
        f"({inp.get('interpolation', 'bicubic')})",
        f"- normalisation: mean {norm.get('mean')}, std {norm.get('std')}",
    ]
    for key, value in (prep.get("prep") or {}).items():
        lines.append(f"- prep `{key}`: {value}")
    lines += ["", "## Training", ""]
    lines += [
        f"- data: {info.get('dataset') or cfg.get('data')} (manifest sha256 {info.get('data_digest')})",
        f"- run: `{source.run}`",
    ]
    if source.kind == "backbone":
        last = (info.get("parts") or [cfg])[-1]
        lines += [
            f"- method: {last.get('method', cfg.get('method'))}, epochs {last.get('epochs', cfg.get('epochs'))}, "
            f"batch {last.get('batch_size')}, recipe {last.get('recipe')}, optimizer {last.get('optimizer')}, "
            f"lr {last.get('lr')}",
        ]
        if cfg.get("init") not in (None, "random"):
            lines.append(f"- initialised from: {cfg['init']} (weights sha256 {cfg.get('init_digest')})")
        rows = knn_rows(source.run)
        if rows:
            keys = [k for k in rows[-1] if k != "epoch"]
            lines += ["", "kNN on the val split (train/online_eval.py):", "", "| epoch | " + " | ".join(keys) + " |"]
            lines.append("|" + "---|" * (len(keys) + 1))
            lines += ["| " + " | ".join([str(r["epoch"]), *(_fmt(r.get(k)) for k in keys)]) + " |" for r in rows]
    else:
        results = _read_json(source.run / "results.json")
        test = results.get("test", {})
        lines += [
            f"- init: {info.get('init')}, mode {cfg.get('mode')}, fraction {cfg.get('fraction')}, "
            f"epochs {cfg.get('epochs')}, best val epoch {results.get('best_epoch')}",
            "- test: " + ", ".join(f"{k} {_fmt(test[k])}" for k in ("accuracy", "macro_f1", "mean_auroc") if k in test),
        ]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ---- the command --------------------------------------------------------------------------------------------------


def export(run: str | Path, fmt: str = "timm", out: str | Path | None = None, force: bool = False) -> Path:
    """Writes the export of `run` in `fmt` to `out` (default RUN/export-FMT) and returns it. Raises InputError (one
    line) for a run that has not finished, an unknown format, or an `out` that exists without `force`."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    source = load(run)
    out = Path(out) if out is not None else Path(run) / f"export-{fmt}"
    with publishing(out, force, inputs=(run,)) as tmp:
        write_timm(source, tmp) if fmt == "timm" else write_onnx(source, tmp)
        (tmp / "README.md").write_text(model_card(source, fmt))
    return out


@contextmanager
def publishing(out: str | Path, force: bool = False, inputs: tuple[str | Path, ...] = ()):
    """Yields an empty folder beside `out` to fill; it becomes `out` (replacing it with `force`) only once the
    block succeeds, so `out` is never half written. Raises InputError, before anything is written, for an `out`
    that exists without `force`, an `out` with no name of its own (`/`, `.`), or one that is or holds one of
    `inputs` (the run, model or data read): `--force` replaces an earlier output, never what is being read."""
    out = Path(out)
    where = Path(os.path.abspath(out))
    if out.name in ("", ".", "..") or where.parent == where:
        raise InputError(f"--out {out}: give a folder of its own for the output, not {out}")
    for given in inputs:
        if given is None or "://" in str(given):
            continue
        read = Path(os.path.realpath(given))
        if read.is_relative_to(os.path.realpath(where)):
            raise InputError(f"--out {out} is or holds {given}, which this command reads; give another --out")
    if out.exists() and not force:
        raise InputError(f"{out} exists; pass --force to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with naming(out):
            yield tmp
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    prog = program("export", "twinray.train.export")
    parser = OneLineParser(
        prog=prog,
        description=__doc__,
        epilog=examples(
            prog,
            "runs/bt --out exports/bt-timm",
            "runs/bt --format onnx --out exports/bt-onnx",
            "runs/ft --format onnx --out exports/ft-onnx",
        ),  # fmt: skip
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", type=Path, help="a finished pretraining or fine-tuning run directory")
    parser.add_argument("--format", choices=FORMATS, default="timm", help="timm (default) or onnx")
    parser.add_argument("--out", type=Path, default=None, help="the export's folder (default: RUN/export-FORMAT)")
    parser.add_argument("--force", action="store_true", help="replace an --out that exists")
    args = parser.parse_args(argv)
    out = export(args.run, args.format, args.out, args.force)
    print(f"exported {args.run} as {args.format} to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main, prog="export")
