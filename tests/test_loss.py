"""Barlow Twins loss: the paper's formula, BatchNorm parity, invariances, and gradients across 2 CPU processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tests.conftest import correlated_views
from twinray.train.losses.barlow import barlow_twins_loss

N, D, D_IN = 16, 8, 6


def _embeddings(n=N, d=D, seed=0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return correlated_views(n, d, seed, dtype, scale=(0.5, 3), offset=(-2, 5), mix=0.7)


def _reference(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> tuple[float, float, float]:
    """The paper's loss in float64 NumPy with explicit loops: (loss, on_diag, off_diag)."""
    a, b = z1.double().numpy(), z2.double().numpy()
    n, d = a.shape

    def standardise(x):
        mean = x.sum(axis=0) / n
        var = ((x - mean) ** 2).sum(axis=0) / n
        return (x - mean) / np.sqrt(var + 1e-5)

    a, b = standardise(a), standardise(b)
    c = np.zeros((d, d))
    for i in range(d):
        for j in range(d):
            c[i, j] = sum(a[k, i] * b[k, j] for k in range(n)) / n
    on = sum((1 - c[i, i]) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off, on, off


@pytest.mark.parametrize("lambd", [0.0, 5e-3, 0.1, 1.0])
def test_matches_paper_formula(lambd):
    z1, z2 = _embeddings(seed=1)
    loss, stats = barlow_twins_loss(z1, z2, lambd=lambd)
    ref, on, off = _reference(z1, z2, lambd)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert float(stats["on_diag"]) == pytest.approx(on, rel=1e-5)
    assert float(stats["off_diag"]) == pytest.approx(off, rel=1e-5)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())  # device scalars: no sync to log


@pytest.mark.gpu
def test_cuda_matches_paper_formula_and_cpu_gradients():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z1, z2 = _embeddings(n=64, d=32, seed=2)
    ref, _, _ = _reference(z1, z2, 5e-3)
    grads = []
    for device in ("cpu", "cuda"):
        a, b = z1.to(device).clone().requires_grad_(), z2.to(device).clone().requires_grad_()
        loss, _ = barlow_twins_loss(a, b, lambd=5e-3)
        loss.backward()
        assert loss.item() == pytest.approx(ref, rel=1e-4)
        grads.append(torch.cat([a.grad.cpu(), b.grad.cpu()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_computed_in_float32(dtype):
    z1, z2 = (z.requires_grad_() for z in _embeddings(seed=2, dtype=dtype))
    loss, stats = barlow_twins_loss(z1, z2)
    ref, on, off = _reference(z1.detach(), z2.detach(), 5e-3)  # the same rounded inputs, in float64
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-4)
    assert float(stats["off_diag"]) == pytest.approx(off, rel=1e-4)
    loss.backward()
    assert z1.grad.dtype == dtype and torch.isfinite(z1.grad.float()).all()


def test_float64_stays_float64():
    z1, z2 = _embeddings(seed=3, dtype=torch.float64)
    loss, _ = barlow_twins_loss(z1, z2)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(_reference(z1, z2, 5e-3)[0], rel=1e-12)


def test_autocast_does_not_lower_precision():
    z1, z2 = _embeddings(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = barlow_twins_loss(z1, z2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_reference(z1, z2, 5e-3)[0], rel=1e-5)


def test_standardisation_is_batchnorm_in_training_mode():
    z1, z2 = _embeddings(seed=5)
    bn = torch.nn.BatchNorm1d(D, affine=False).train()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    c = bn(a).T @ bn(b) / N
    on = (1 - c.diagonal()).square().sum()
    off = c.square().sum() - c.diagonal().square().sum()
    (on + 5e-3 * off).backward()

    x1, x2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss, stats = barlow_twins_loss(x1, x2)
    loss.backward()
    assert loss.item() == pytest.approx((on + 5e-3 * off).item(), rel=1e-5)
    assert float(stats["on_diag"]) == pytest.approx(on.item(), rel=1e-5)
    assert float(stats["off_diag"]) == pytest.approx(off.item(), rel=1e-5)
    torch.testing.assert_close(x1.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x2.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_invariant_to_per_feature_affine_rescaling():
    z1, z2 = _embeddings(seed=6)
    g = torch.Generator().manual_seed(7)
    scale1, scale2 = torch.rand(2, D, generator=g) * 3.5 + 0.5  # positive, 0.5 to 4
    shift1, shift2 = torch.randn(2, D, generator=g) * 50
    loss, stats = barlow_twins_loss(z1, z2)
    moved, moved_stats = barlow_twins_loss(z1 * scale1 + shift1, z2 * scale2 + shift2)
    assert moved.item() == pytest.approx(loss.item(), rel=1e-4)
    assert float(moved_stats["off_diag"]) == pytest.approx(float(stats["off_diag"]), rel=1e-4)


def test_identical_views_have_no_on_diagonal_loss():
    z1, _ = _embeddings(seed=8)
    _, stats = barlow_twins_loss(z1, z1.clone())
    assert stats["on_diag"] < 1e-8  # c_ii = var / (var + eps), so only eps's trace is left
    assert stats["off_diag"] > 0  # the features of one view still correlate with each other


@pytest.mark.parametrize(
    "shape1, shape2, match",
    [
        ((16, 8), (16, 7), "equal shapes"),
        ((16, 8), (15, 8), "equal shapes"),
        ((16,), (16,), "2-D"),
        ((2, 16, 8), (2, 16, 8), "2-D"),
        ((1, 8), (1, 8), "at least 2 samples"),
        ((0, 8), (0, 8), "at least 2 samples"),
    ],
)
def test_rejects_bad_shapes(shape1, shape2, match):
    with pytest.raises(ValueError, match=match):
        barlow_twins_loss(torch.randn(shape1), torch.randn(shape2))


# --- 2 CPU processes (gloo) against one process on the whole batch ---------------------------------------------

WORLD = 2
SPLITS = {"even": [0, 8, 16], "uneven": [0, 11, 16]}  # rows of the global batch held by each rank


def _naive_loss(z1, z2, lambd=5e-3):
    """The bug the loss avoids: plain dist.all_reduce gives global values, but autograd only sees the local terms."""

    def plain_sum(x):
        with torch.no_grad():
            dist.all_reduce(x)
        return x

    n = plain_sum(torch.tensor(float(z1.shape[0])))
    a, b = ((z - plain_sum(z.sum(0)) / n) for z in (z1, z2))
    a = a / torch.sqrt(plain_sum(a.square().sum(0)) / n + 1e-5)
    b = b / torch.sqrt(plain_sum(b.square().sum(0)) / n + 1e-5)
    c = plain_sum(a.T @ b) / n
    return (1 - c.diagonal()).square().sum() + lambd * (c.square().sum() - c.diagonal().square().sum())


def _projector_and_inputs() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(11)
    return torch.nn.Linear(D_IN, D), torch.randn(N, D_IN), torch.randn(N, D_IN)


def _loss_and_grads(fn, z1, z2, rows=slice(None)):
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    out = fn(a, b)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return {"loss": loss.detach(), "g1": a.grad, "g2": b.grad}


def _projector_grads(rows=slice(None)):
    proj, x1, x2 = _projector_and_inputs()
    loss, _ = barlow_twins_loss(proj(x1[rows]), proj(x2[rows]))
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in proj.named_parameters()}}


def _rank_results(rank: int) -> dict:
    """One rank's loss and gradients of its rows of each split (run in a 2-process gloo group by `gloo`)."""
    z1, z2 = _embeddings()
    results = {}
    for split, bounds in SPLITS.items():
        rows = slice(bounds[rank], bounds[rank + 1])
        results[split] = _loss_and_grads(barlow_twins_loss, z1, z2, rows)
        results[f"naive_{split}"] = _loss_and_grads(_naive_loss, z1, z2, rows)
        results[f"projector_{split}"] = _projector_grads(rows)
    return results


def test_distributed_matches_single_process(gloo):
    ranks = gloo(_rank_results, world=WORLD)
    z1, z2 = _embeddings()
    single = _loss_and_grads(barlow_twins_loss, z1, z2)
    single_projector = _projector_grads()

    for split, bounds in SPLITS.items():
        for rank, res in enumerate(ranks):
            rows = slice(bounds[rank], bounds[rank + 1])
            ours, naive = res[split], res[f"naive_{split}"]
            torch.testing.assert_close(ours["loss"], single["loss"], rtol=0, atol=1e-6)
            torch.testing.assert_close(naive["loss"], single["loss"], rtol=0, atol=1e-6)  # the value is right...
            for g in ("g1", "g2"):
                # Each rank's backward sums all ranks' (identical) upstream gradients: world_size * dL/dz.
                torch.testing.assert_close(ours[g], WORLD * single[g][rows], rtol=0, atol=1e-6)
                # ...but the plain all_reduce loses the other ranks' terms through mean, variance and c.
                for scale in (1, WORLD):
                    assert (naive[g] - scale * single[g][rows]).abs().max() > 1e-3, (split, rank, g, scale)

        # Parameters shared by the ranks, as DDP holds them: the DDP average is the single-process gradient.
        projector = [res[f"projector_{split}"] for res in ranks]
        for res in projector:
            torch.testing.assert_close(res["loss"], single_projector["loss"], rtol=0, atol=1e-6)
        for name in ("weight", "bias"):
            summed = sum(res[name] for res in projector)
            # rtol too: the weight gradient is ~5, where float32's spacing is already ~5e-7.
            torch.testing.assert_close(summed / WORLD, single_projector[name], rtol=1e-5, atol=1e-6)
        # Summing instead would double the step (the bias gradient is ~0: standardisation removes any shift).
        assert (sum(res["weight"] for res in projector) - single_projector["weight"]).abs().max() > 1e-3
