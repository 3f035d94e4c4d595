"""Each self-supervised method's defaults, from its paper, in one place (docs/methods.md shows this table).

`train/pretrain.py --method NAME` starts from these values (train/config.py fills PretrainConfig's method-dependent
fields from them, the learning rate at the run's batch); its config and flags override them. Learning rates are
given at the study's batch of 128 images, scaled from the paper's batch only with the rule the paper (or its
official code) states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUDY_BATCH = 128


@dataclass(frozen=True)
class MethodDefaults:
    """A method's defaults and where each comes from.

    projector: the head's spec string (train/model.py's format, e.g. '2048-128': hidden 2048, output 128; sizes are
        the papers', which use a ResNet-50); projector_batch_norm: whether its hidden layers have BatchNorm
        (train/heads.py build_head). predictor: BYOL's predictor spec, else None.
    temperature: the contrastive temperature (SimCLR, MoCo), else None. momentum: the EMA rate of the momentum
        encoder (its base for a cosine schedule), else None; momentum_schedule: 'constant' or 'cosine'.
    queue_size: MoCo's number of negative keys. key_bn_chunk: rows per BatchNorm batch of MoCo's key encoder
        (train/momentum.py shuffled_forward).
    optimizer: a train/optim.py name; base_lr at base_batch images, scaled by lr_scaling ('linear': lr = base_lr *
        batch / base_batch; 'none': as it is) to `lr(batch)`; weight_decay; schedule; warmup_epochs.
    coefficients: the loss's weights and constants by the loss function's keyword names.
    sources: field name -> where the value comes from (paper section, table or official code).
    """

    name: str
    paper: str
    projector: str
    projector_batch_norm: bool
    optimizer: str
    base_lr: float
    base_batch: int
    lr_scaling: str
    weight_decay: float
    schedule: str
    warmup_epochs: float
    predictor: str | None = None
    temperature: float | None = None
    momentum: float | None = None
    momentum_schedule: str | None = None
    queue_size: int | None = None
    key_bn_chunk: int | None = None
    coefficients: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def lr(self, batch: int = STUDY_BATCH) -> float:
        """The learning rate at `batch` images per step (all processes together)."""
        if self.lr_scaling == "linear":
            return self.base_lr * batch / self.base_batch
        return self.base_lr


METHODS: dict[str, MethodDefaults] = {
    "barlow": MethodDefaults(
        name="Barlow Twins",
        paper="Zbontar et al. 2021, arXiv:2103.03230",
        projector="512",
        projector_batch_norm=True,
        optimizer="adam",
        base_lr=2e-3,
        base_batch=STUDY_BATCH,
        lr_scaling="none",
        weight_decay=1e-5,
        schedule="cosine",
        warmup_epochs=0.0,
        coefficients={"lambd": 5e-3},
        sources={
            "*": "twinray's default, the study's settings (train/config.py PretrainConfig), not the paper's "
            "(8192-8192-8192, LARS 0.2 at batch 2048): today's behaviour stays the default",
            "coefficients": "lambd 5e-3: the paper, section 2",
        },
    ),
    "simclr": MethodDefaults(
        name="SimCLR",
        paper="Chen et al. 2020, arXiv:2002.05709",
        projector="2048-128",
        projector_batch_norm=True,
        optimizer="lars",
        base_lr=0.3,
        base_batch=256,
        lr_scaling="linear",
        weight_decay=1e-6,
        schedule="cosine",
        warmup_epochs=10.0,
        temperature=0.1,
        sources={
            "projector": "section 2.1 and the default setting (section 2.3): one hidden layer as wide as the "
            "ResNet-50 features (2048), ReLU, 128-d output",
            "projector_batch_norm": "official code (google-research/simclr): BatchNorm in the head's layers",
            "temperature": "Table 5 (tau = 0.1 best at batch 4096) and the official code's default",
            "optimizer": "section 2.3: LARS, lr = 0.3 x BatchSize/256 (linear rule), weight decay 1e-6, 10 warm-up "
            "epochs then cosine decay. Appendix B.1 also gives 0.075 x sqrt(BatchSize) for small batches (0.85 at "
            "128); not the default here",
        },
    ),
    "moco": MethodDefaults(
        name="MoCo v2",
        paper="He et al. 2020, arXiv:1911.05722; Chen et al. 2020, arXiv:2003.04297",
        projector="2048-128",
        projector_batch_norm=False,
        optimizer="sgd",
        base_lr=0.03,
        base_batch=256,
        lr_scaling="linear",
        weight_decay=1e-4,
        schedule="cosine",
        warmup_epochs=0.0,
        temperature=0.2,
        momentum=0.999,
        momentum_schedule="constant",
        queue_size=65536,
        key_bn_chunk=32,
        sources={
            "projector": "MoCo v2 section 2: a 2-layer MLP head (hidden 2048, ReLU) on a 128-d output (MoCo "
            "section 4.1); the official code's head has biases and no BatchNorm",
            "temperature": "MoCo v2 section 2 and Table 1: tau = 0.2 with the MLP head",
            "momentum": "MoCo section 4.1 and Table 4: m = 0.999, constant",
            "queue_size": "MoCo section 4.1: K = 65536",
            "key_bn_chunk": "MoCo section 3.3: shuffled BN over 8 GPUs, 32 images each (batch 256)",
            "optimizer": "MoCo section 4.1: SGD, momentum 0.9, weight decay 1e-4, lr 0.03 at batch 256; MoCo v2: "
            "cosine schedule; official README (facebookresearch/moco): lr 0.015 at batch 128 (linear rule)",
        },
    ),
    "byol": MethodDefaults(
        name="BYOL",
        paper="Grill et al. 2020, arXiv:2006.07733",
        projector="4096-256",
        projector_batch_norm=True,
        predictor="4096-256",
        optimizer="lars",
        base_lr=0.2,
        base_batch=256,
        lr_scaling="linear",
        weight_decay=1.5e-6,
        schedule="cosine",
        warmup_epochs=10.0,
        momentum=0.996,
        momentum_schedule="cosine",
        sources={
            "projector": "section 3.3: Linear 4096, BatchNorm, ReLU, Linear 256",
            "predictor": "section 3.3: the same architecture as the projector",
            "momentum": "section 3.3: tau_base = 0.996, raised to 1 by tau = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2",
            "optimizer": "section 3.3: LARS (biases and BatchNorm excluded), lr = 0.2 x BatchSize/256 (linear "
            "rule), weight decay 1.5e-6, 10 warm-up epochs then cosine decay",
        },
    ),
    "vicreg": MethodDefaults(
        name="VICReg",
        paper="Bardes, Ponce and LeCun 2022, arXiv:2105.04906",
        projector="8192-8192-8192",
        projector_batch_norm=True,
        optimizer="lars",
        base_lr=0.2,
        base_batch=256,
        lr_scaling="linear",
        weight_decay=1e-6,
        schedule="cosine",
        warmup_epochs=10.0,
        coefficients={"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0, "gamma": 1.0, "eps": 1e-4},
        sources={
            "projector": "section 4.1: an expander of 3 layers of 8192, BatchNorm and ReLU between them",
            "coefficients": "section 4.1: lambda = mu = 25, nu = 1; gamma = 1 and eps = 1e-4 (sections 3.1, 4.1)",
            "optimizer": "section 4.1: LARS, weight decay 1e-6, lr = base_lr x BatchSize/256 with base_lr 0.2 "
            "(linear rule), 10 warm-up epochs then cosine decay",
        },
    ),
}


def defaults_table(batch: int = STUDY_BATCH) -> str:
    """The defaults as a Markdown table (docs/methods.md holds this text; a test keeps them equal)."""
    rows = [
        ("projector", lambda m: m.projector + ("" if m.projector_batch_norm else " (no BN)")),
        ("predictor", lambda m: m.predictor or "-"),
        ("temperature", lambda m: _value(m.temperature)),
        ("momentum", lambda m: f"{m.momentum} ({m.momentum_schedule})" if m.momentum else "-"),
        ("queue", lambda m: _value(m.queue_size)),
        ("key BN chunk", lambda m: _value(m.key_bn_chunk)),
        ("optimizer", lambda m: m.optimizer),
        (f"lr at batch {batch}", lambda m: f"{m.lr(batch):.4g}" + _rule(m)),
        ("weight decay", lambda m: f"{m.weight_decay:g}"),
        ("schedule", lambda m: f"{m.schedule}, {m.warmup_epochs:g} warm-up epochs"),
        ("loss coefficients", lambda m: ", ".join(f"{k} {v:g}" for k, v in m.coefficients.items()) or "-"),
    ]
    keys = list(METHODS)
    lines = ["| | " + " | ".join(f"`{k}` ({METHODS[k].name})" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(fn(METHODS[k]) for k in keys) + " |" for label, fn in rows]
    return "\n".join(lines) + "\n"


def _value(x) -> str:
    return "-" if x is None else f"{x:g}"


def _rule(m: MethodDefaults) -> str:
    return f" ({m.base_lr:g} x B/{m.base_batch})" if m.lr_scaling == "linear" else ""
