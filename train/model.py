"""The twins: a timm backbone without classifier and a projector built from a spec string (train/heads.py); and the
downstream Classifier (backbone and linear head) that finetune trains and gradcam explains."""

from __future__ import annotations

import timm
import torch
from torch import nn

from twinray.train.heads import build_head, build_predictor, parse_projector
from twinray.train.momentum import KeyQueue, MomentumEncoder

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", *(f"efficientnet_b{k}" for k in range(5)))
# timm's output_stride: the input side over the last feature map's side. 32 is the architecture as published; 16
# (or 8) keeps the last stage (or two) at the resolution before it, dilating their convolutions instead of striding
# (Chen et al., DeepLab, 2017), so a 64-px view ends in a 4 x 4 map, not 2 x 2. The weights are the same tensors.
OUTPUT_STRIDES = (32, 16, 8)


def build_backbone(
    name: str = "resnet18", in_chans: int = 1, pretrained: bool = False, output_stride: int = 32
) -> nn.Module:
    """A timm model with no classifier (`num_features` outputs): N x C x S x S float -> N x num_features, its last
    map S / output_stride on a side before the global average pool. ResNets zero-initialise the last BN of each
    residual block, so every block starts as the identity. Raises ValueError for a name, channel count or
    output_stride outside BACKBONES, (1, 3) and OUTPUT_STRIDES."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r} is not one of {', '.join(BACKBONES)}")
    if in_chans not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {in_chans}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, got {output_stride}")
    extra = {"zero_init_last": True} if name.startswith("resnet") else {}
    if output_stride != 32:  # left out at 32, so timm's own default stays what builds the published architecture
        extra["output_stride"] = output_stride
    return timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **extra)


class BarlowTwins(nn.Module):
    """A backbone and a projector: `model(x) -> (backbone features, projection)`. projector_batch_norm=False builds
    MoCo v2's head (biases, no BatchNorm; train/heads.py build_head)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 1,
        projector: str = "512",
        projector_batch_norm: bool = True,
        output_stride: int = 32,
    ):
        super().__init__()
        self.backbone = build_backbone(backbone, in_chans, output_stride=output_stride)
        self.projector = build_head(self.backbone.num_features, projector, projector_batch_norm)
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One view -> (backbone features, projector embedding). Grey views are repeated for 3-channel stems."""
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, self.in_chans, -1, -1)
        features = self.backbone(x)
        return features, self.projector(features)


class _Online(nn.Module):
    """A backbone and a projector held together (not owned): the online network that a momentum encoder copies
    and follows, without the model's other pieces."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, in_chans: int):
        super().__init__()
        self.backbone, self.projector, self.in_chans = backbone, projector, in_chans

    forward = BarlowTwins.forward


class PretrainModel(BarlowTwins):
    """What a pretraining run trains and checkpoints, for every method (train/state.py build_run builds it from
    the run's config): the online network of BarlowTwins (`model(x) -> (features, projection)`, `model.backbone`,
    which the online probe, kNN and the exported backbone use), and the pieces some methods add, each a submodule
    so that the model's state_dict (and so every checkpoint) holds it:

    predictor: BYOL's predictor spec ('4096-256'), or None; `model(x, predict=True)` also returns its output.
    momentum_encoder: an EMA copy of the online network (`target`: MoCo's key encoder, BYOL's target network),
        with no gradient; `update_target(m)` moves it one EMA step toward the online network.
    queue_size: MoCo's queue of negative keys (`queue`, a KeyQueue of the projection's size), or None.

    Without them (barlow, simclr, vicreg) it is BarlowTwins itself: the same weights, names and initial draws.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        in_chans: int = 1,
        projector: str = "512",
        projector_batch_norm: bool = True,
        predictor: str | None = None,
        momentum_encoder: bool = False,
        queue_size: int | None = None,
        output_stride: int = 32,
    ):
        super().__init__(backbone, in_chans, projector, projector_batch_norm, output_stride)
        dim = parse_projector(projector)[-1]
        self.predictor = build_predictor(dim, predictor) if predictor else None
        self.target = MomentumEncoder(self.online()) if momentum_encoder else None
        self.queue = KeyQueue(queue_size, dim) if queue_size else None
        if queue_size:
            # The queue is the same on every rank (its enqueue gathers all ranks' keys): DDP need not broadcast
            # its K x D buffer from rank 0 at every forward.
            self._ddp_params_and_buffers_to_ignore = ["queue.keys", "queue.ptr"]

    def online(self) -> nn.Module:
        """The online network (backbone and projector) as one module, for the momentum encoder."""
        return _Online(self.backbone, self.projector, self.in_chans)

    def forward(self, x: torch.Tensor, predict: bool = False):
        """(features, projection); with predict=True, (features, projection, the predictor's output)."""
        features, z = super().forward(x)
        if predict:
            return features, z, self.predictor(z)
        return features, z

    @torch.no_grad()
    def update_target(self, m: float) -> None:
        self.target.update(self.online(), m)


class Classifier(nn.Module):
    """Backbone, then a linear head on standardised features (BatchNorm without affine): with zero-initialised
    residual branches, fresh features are tiny, and a plain head would sit at the majority class."""

    def __init__(self, backbone: nn.Module, outputs: int, in_chans: int = 1):
        super().__init__()
        self.backbone, self.in_chans = backbone, in_chans
        self.head = nn.Sequential(
            nn.BatchNorm1d(backbone.num_features, affine=False), nn.Linear(backbone.num_features, outputs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_chans:  # grey views are repeated for 3-channel stems, as in pretraining
            x = x.expand(-1, self.in_chans, -1, -1)
        return self.head(self.backbone(x))
