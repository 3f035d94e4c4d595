"""SimCLR, MoCo v2, BYOL and VICReg across 2 CPU processes (gloo): the same loss and gradients as one process on
the same global batch, and MoCo's queue filled with every rank's keys. One spawn runs every case."""

from __future__ import annotations

import pytest
import torch

from twinray.train.losses.byol import byol_loss
from twinray.train.losses.moco import info_nce_loss
from twinray.train.losses.simclr import nt_xent_loss
from twinray.train.losses.vicreg import vicreg_loss
from twinray.train.momentum import KeyQueue

WORLD, N, D, D_IN, QUEUE = 2, 8, 5, 4, 12  # N: the global batch; each rank holds N / WORLD rows


def _inputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=g) * 2 + 0.5 for _ in range(4)]


FIXED = _inputs(100)  # MoCo's queue rows, BYOL's targets: the same on every rank, no gradient


def _loss(method: str, a: torch.Tensor, b: torch.Tensor, rows: slice) -> torch.Tensor:
    """The method's loss of this rank's rows `a`, `b` (two views, or query and key)."""
    if method == "simclr":
        return nt_xent_loss(a, b, 0.2)[0]
    if method == "moco":
        return info_nce_loss(a, b, torch.cat(FIXED[:2]), 0.2)[0]  # 16 queue keys
    if method == "byol":
        return byol_loss(a, b, FIXED[2][rows], FIXED[3][rows])[0]
    return vicreg_loss(a, b)[0]


METHODS = ("simclr", "moco", "byol", "vicreg")


def _embedding_grads(method: str, rows=slice(None)) -> dict[str, torch.Tensor]:
    z1, z2 = _inputs(1)[:2]
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = _loss(method, a, b, rows)
    loss.backward()
    out = {"loss": loss.detach(), "g1": a.grad}
    if method != "moco":  # MoCo's keys carry no gradient
        out["g2"] = b.grad
    return out


def _projector_grads(method: str, rows=slice(None)) -> dict[str, torch.Tensor]:
    """Parameters shared by the ranks, as DDP holds them."""
    torch.manual_seed(11)
    proj = torch.nn.Linear(D_IN, D)
    g = torch.Generator().manual_seed(12)
    x1, x2 = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    loss = _loss(method, proj(x1[rows]), proj(x2[rows]), rows)
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in proj.named_parameters()}}


def _queue_after_enqueue(rows=slice(None)) -> dict[str, torch.Tensor]:
    """A queue whose pointer sits 4 rows before its end, so the global batch of 8 keys wraps around."""
    queue = KeyQueue(QUEUE, D, generator=torch.Generator().manual_seed(5))
    queue.ptr.fill_(QUEUE - 4)
    queue.enqueue(_inputs(2)[0][rows])
    return {k: v.clone() for k, v in queue.state_dict().items()}


def _rank_results(rank: int) -> dict:
    """One rank's queue, losses and gradients of its rows (run in a 2-process gloo group by `gloo`)."""
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    results = {"queue": _queue_after_enqueue(rows)}
    for method in METHODS:
        results[method] = _embedding_grads(method, rows)
        results[f"projector_{method}"] = _projector_grads(method, rows)
    return results


@pytest.fixture(scope="module")
def ranks(gloo) -> list[dict]:
    return gloo(_rank_results, world=WORLD, timeout_s=90)


@pytest.mark.parametrize("method", METHODS)
def test_loss_and_gradients_match_one_process(ranks, method):
    single = _embedding_grads(method)
    for rank, res in enumerate(ranks):
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        ours = res[method]
        torch.testing.assert_close(ours["loss"], single["loss"], rtol=1e-6, atol=1e-6)
        for g in ("g1", "g2") if method != "moco" else ("g1",):
            # train/losses/collectives.py's convention: each rank's backward sums all ranks' terms,
            # world_size * dL/dz.
            torch.testing.assert_close(ours[g], WORLD * single[g][rows], rtol=1e-5, atol=1e-6)
            assert single[g][rows].abs().max() > 1e-3  # a gradient that could be wrong

    single = _projector_grads(method)
    projector = [res[f"projector_{method}"] for res in ranks]
    for res in projector:
        torch.testing.assert_close(res["loss"], single["loss"], rtol=1e-6, atol=1e-6)
    for name in ("weight", "bias"):
        # DDP's average over ranks gives the single-process gradient.
        torch.testing.assert_close(sum(res[name] for res in projector) / WORLD, single[name], rtol=1e-5, atol=1e-6)
    assert single["weight"].abs().max() > 1e-3


def test_queue_enqueue_spans_ranks(ranks):
    single = _queue_after_enqueue()
    keys = torch.nn.functional.normalize(_inputs(2)[0], dim=1)
    for res in ranks:
        torch.testing.assert_close(res["queue"]["keys"], single["keys"], rtol=0, atol=0)
        assert res["queue"]["ptr"].item() == 4  # (12 - 4 + 8) % 12
    # Rank 0's keys, then rank 1's, from the pointer on: rows 8..11 then 0..3.
    torch.testing.assert_close(single["keys"][QUEUE - 4 :], keys[:4])
    torch.testing.assert_close(single["keys"][:4], keys[4:])
    untouched = KeyQueue(QUEUE, D, generator=torch.Generator().manual_seed(5)).keys
    torch.testing.assert_close(single["keys"][4 : QUEUE - 4], untouched[4 : QUEUE - 4])
