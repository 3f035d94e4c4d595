"""Projection heads per method and BYOL's predictor, from spec strings ('4096-256': the sizes of the layers)."""

from __future__ import annotations

from torch import nn


def parse_projector(spec: str) -> list[int]:
    try:
        dims = [int(d) for d in str(spec).split("-")]
    except ValueError:
        raise ValueError(f"projector {spec!r} is not a list of sizes like 512 or 8192-8192-8192") from None
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"projector {spec!r} must list positive sizes")
    return dims


def build_projector(in_features: int, spec: str = "512") -> nn.Sequential:
    """Linear(no bias)-BN-ReLU blocks, then a last Linear alone: '512' is one Linear, '512-512' two layers."""
    dims = [in_features, *parse_projector(spec)]
    layers: list[nn.Module] = []
    for k in range(len(dims) - 2):
        layers += [nn.Linear(dims[k], dims[k + 1], bias=False), nn.BatchNorm1d(dims[k + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1], bias=False))
    return nn.Sequential(*layers)


def build_head(in_features: int, spec: str, batch_norm: bool = True) -> nn.Sequential:
    """A projection head (or BYOL's predictor) from a spec string such as '4096-256' (parse_projector's format).

    batch_norm=True: build_projector (Linear without bias, BatchNorm1d, ReLU per hidden layer;
    a last Linear alone), as SimCLR's, BYOL's and VICReg's heads are built. batch_norm=False: Linear (with bias),
    ReLU per hidden layer, a last Linear: MoCo v2's head (its official code has no BatchNorm in the head).
    """
    if batch_norm:
        return build_projector(in_features, spec)
    dims = [in_features, *parse_projector(spec)]
    layers: list[nn.Module] = []
    for k in range(len(dims) - 2):
        layers += [nn.Linear(dims[k], dims[k + 1]), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


def build_predictor(dim: int = 256, spec: str = "4096-256") -> nn.Sequential:
    """BYOL's predictor q: the same MLP shape as its projector (hidden 4096 with BatchNorm and ReLU, output 256;
    BYOL section 3.3), from `dim` (the projector's output) to the last size of `spec`, which must equal `dim`
    (the prediction is compared with the target's projection). Raises ValueError otherwise."""
    if parse_projector(spec)[-1] != dim:
        raise ValueError(f"predictor {spec!r} must end with the projection size {dim}")
    return build_head(dim, spec, batch_norm=True)
