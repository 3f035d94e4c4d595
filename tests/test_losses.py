"""SimCLR, MoCo v2, BYOL and VICReg losses (train/losses/) against float64 references written from the papers; the
registry (train/methods/) against docs/methods.md."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import correlated_views
from twinray.train.losses.byol import byol_loss, byol_momentum
from twinray.train.losses.moco import info_nce_loss
from twinray.train.losses.simclr import nt_xent_loss
from twinray.train.losses.vicreg import vicreg_loss
from twinray.train.methods import METHODS
from twinray.train.methods.table import defaults_table, methods_table, sources_text

N, D, K = 6, 5, 9


def _views(n=N, d=D, seed=0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return correlated_views(n, d, seed, dtype, scale=(0.5, 2), offset=(-1, 1), mix=0.6)


def _cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- float64 references, one formula each, with loops over the papers' indices ------------------------------------


def _nt_xent_reference(z1, z2, t) -> float:
    """SimCLR eq. 1 with the paper's layout: views 2k and 2k+1 are the two views of image k."""
    views = [v for pair in zip(z1.double().numpy(), z2.double().numpy(), strict=True) for v in pair]
    total = 0.0
    for i in range(len(views)):
        j = i + 1 if i % 2 == 0 else i - 1
        denominator = sum(math.exp(_cos(views[i], views[k]) / t) for k in range(len(views)) if k != i)
        total += -math.log(math.exp(_cos(views[i], views[j]) / t) / denominator)
    return total / len(views)


def _info_nce_reference(q, k, queue, t) -> float:
    """MoCo eq. 1 for each query, averaged."""
    q, k, queue = q.double().numpy(), k.double().numpy(), queue.double().numpy()
    total = 0.0
    for i in range(len(q)):
        positive = math.exp(_cos(q[i], k[i]) / t)
        negatives = sum(math.exp(_cos(q[i], key) / t) for key in queue)
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


def _byol_reference(p1, p2, t1, t2) -> float:
    """BYOL eq. 2 as a squared distance of unit vectors (not the 2 - 2 cos form), symmetrised, averaged."""
    p1, p2, t1, t2 = (x.double().numpy() for x in (p1, p2, t1, t2))
    total = 0.0
    for i in range(len(p1)):
        for p, t in ((p1[i], t2[i]), (p2[i], t1[i])):
            total += float(np.sum((p / np.linalg.norm(p) - t / np.linalg.norm(t)) ** 2))
    return total / len(p1)


def _vicreg_reference(z1, z2, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4) -> tuple[float, float, float, float]:
    """VICReg eqs. 1-6 (invariance averaged over features too, as in Algorithm 1): (loss, s, v + v', c + c')."""
    a, b = z1.double().numpy(), z2.double().numpy()
    n, d = a.shape
    s = sum((a[i, j] - b[i, j]) ** 2 for i in range(n) for j in range(d)) / (n * d)

    def v(z):
        stds = []
        for j in range(d):
            mean = sum(z[:, j]) / n
            stds.append(math.sqrt(sum((z[i, j] - mean) ** 2 for i in range(n)) / (n - 1) + eps))
        return sum(max(0.0, gamma - s_j) for s_j in stds) / d

    def c(z):
        mean = z.sum(axis=0) / n
        cov = [
            [sum((z[k, i] - mean[i]) * (z[k, j] - mean[j]) for k in range(n)) / (n - 1) for j in range(d)]
            for i in range(d)
        ]
        return sum(cov[i][j] ** 2 for i in range(d) for j in range(d) if i != j) / d

    var, covar = v(a) + v(b), c(a) + c(b)
    return lam * s + mu * var + nu * covar, s, var, covar


# --- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_paper(temperature):
    z1, z2 = _views(seed=1)
    loss, stats = nt_xent_loss(z1, z2, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(_nt_xent_reference(z1, z2, temperature), rel=1e-5)
    positive = np.mean([_cos(a, b) for a, b in zip(z1.double().numpy(), z2.double().numpy(), strict=True)])
    assert float(stats["positive_similarity"]) == pytest.approx(positive, rel=1e-5)


def test_nt_xent_closed_form():
    """Orthogonal unit images, two identical views: l = -log(e^(1/t) / (e^(1/t) + 2N - 2)) for every view."""
    z = torch.eye(N, D + N)  # N orthogonal unit rows
    t = 0.2
    loss, _ = nt_xent_loss(z, z.clone(), t)
    assert loss.item() == pytest.approx(-math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * N - 2)), rel=1e-6)


@pytest.mark.parametrize("temperature, queue_size", [(0.2, K), (0.07, K), (1.0, 1), (0.2, 64)])
def test_info_nce_matches_paper(temperature, queue_size):
    q, k = _views(seed=2)
    queue = torch.randn(queue_size, D, generator=torch.Generator().manual_seed(3))
    loss, stats = info_nce_loss(q, k, queue, temperature)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(_info_nce_reference(q, k, queue, temperature), rel=1e-5)
    positive = np.mean([_cos(a, b) for a, b in zip(q.double().numpy(), k.double().numpy(), strict=True)])
    assert float(stats["positive_similarity"]) == pytest.approx(positive, rel=1e-5)


def test_info_nce_closed_form_and_no_key_gradient():
    """q = k and a queue orthogonal to every query: l = -log(e^(1/t) / (e^(1/t) + K)); keys get no gradient."""
    q = torch.eye(N, 2 * N).requires_grad_()
    k = q.detach().clone().requires_grad_()
    queue = torch.eye(2 * N)[N:]  # N keys orthogonal to all queries
    loss, _ = info_nce_loss(q * 3.0, k, queue, 0.5)  # the scale of q does not matter
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + N)), rel=1e-6)
    loss.backward()
    assert k.grad is None and q.grad is not None


def test_byol_matches_paper_and_bounds():
    p1, p2 = _views(seed=4)
    t1, t2 = _views(seed=5)
    loss, stats = byol_loss(p1, p2, t1, t2)
    assert loss.item() == pytest.approx(_byol_reference(p1, p2, t1, t2), rel=1e-5)
    cosines = [_cos(a, b) for x, y in ((p1, t2), (p2, t1)) for a, b in zip(x.numpy(), y.numpy(), strict=True)]
    assert float(stats["cosine"]) == pytest.approx(np.mean(cosines), rel=1e-5)
    assert byol_loss(p1, p2, 2 * p2, 3 * p1)[0].item() == pytest.approx(0.0, abs=1e-6)  # aligned: 0
    assert byol_loss(p1, p2, -p2, -p1)[0].item() == pytest.approx(8.0, rel=1e-6)  # opposed: 2 x 4


def test_byol_target_gets_no_gradient():
    p1, p2, t1, t2 = (x.requires_grad_() for x in (*_views(seed=6), *_views(seed=7)))
    byol_loss(p1, p2, t1, t2)[0].backward()
    assert t1.grad is None and t2.grad is None and p1.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "base, step, total, expected",
    [
        (0.996, 0, 100, 0.996),
        (0.996, 100, 100, 1.0),
        (0.996, 50, 100, 0.998),
        (0.99, 25, 100, None),
        (0.996, 150, 100, 1.0),
    ],
)
def test_byol_momentum_cosine_schedule(base, step, total, expected):
    if expected is None:
        expected = 1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2
    assert byol_momentum(step, total, base) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("coefficients", [{}, {"sim_coeff": 1.0, "std_coeff": 2.0, "cov_coeff": 3.0, "gamma": 2.0}])
def test_vicreg_matches_paper(coefficients):
    z1, z2 = _views(seed=8)
    loss, stats = vicreg_loss(z1, z2, **coefficients)
    keys = {"sim_coeff": "lam", "std_coeff": "mu", "cov_coeff": "nu", "gamma": "gamma"}
    ref, s, v, c = _vicreg_reference(z1, z2, **{keys[k]: x for k, x in coefficients.items()})
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert [float(stats[k]) for k in ("invariance", "variance", "covariance")] == pytest.approx([s, v, c], rel=1e-5)
    assert v > 0 and c > 0  # both terms are exercised


def test_vicreg_variance_hinge_is_zero_above_gamma():
    z1, _ = _views(seed=9)
    _, stats = vicreg_loss(z1 * 10, z1 * 10)  # std well above 1 in every feature, identical views
    assert float(stats["variance"]) == 0.0 and float(stats["invariance"]) == 0.0


# --- precision, gradients, errors -----------------------------------------------------------------------------

QUEUE = torch.randn(K, D, generator=torch.Generator().manual_seed(10))
TARGETS = _views(seed=13)  # BYOL's targets: constants, as the loss detaches them
LOSSES = {
    "simclr": lambda a, b: nt_xent_loss(a, b, 0.3),
    "moco": lambda a, b: info_nce_loss(a, b, QUEUE[:, : a.shape[1]].to(a.device), 0.3),
    "byol": lambda a, b: byol_loss(a, b, *(t[: a.shape[0], : a.shape[1]].to(a.device) for t in TARGETS)),
    "vicreg": lambda a, b: vicreg_loss(a, b),
}


@pytest.mark.parametrize("method", LOSSES)
def test_float64_gradients_match_finite_differences(method):
    z1, z2 = (z.requires_grad_() for z in _views(n=4, d=3, seed=11, dtype=torch.float64))
    assert LOSSES[method](z1, z2)[0].dtype == torch.float64
    inputs = (z1,) if method == "moco" else (z1, z2)  # MoCo's keys carry no gradient
    fn = (lambda a: LOSSES[method](a, z2)[0]) if method == "moco" else (lambda a, b: LOSSES[method](a, b)[0])
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("method", LOSSES)
def test_half_inputs_and_autocast_computed_in_float32(method):
    z1, z2 = _views(seed=12)
    exact = LOSSES[method](z1.double(), z2.double())[0].item()
    low1, low2 = z1.bfloat16(), z2.bfloat16()
    rounded = LOSSES[method](low1.double(), low2.double())[0].item()  # float64 on the same rounded inputs
    loss = LOSSES[method](low1, low2)[0]
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(rounded, rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[method](z1, z2)[0]
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(exact, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", LOSSES)
def test_cuda_matches_cpu_without_host_sync(method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    z1, z2 = _views(seed=14)
    results = []
    for device in ("cpu", "cuda"):
        a, b = (z.to(device).requires_grad_() for z in (z1, z2))
        torch.cuda.set_sync_debug_mode("error")  # a host sync in the forward or backward raises
        try:
            loss, stats = LOSSES[method](a, b)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append([loss.detach().cpu(), a.grad.cpu(), *[v.cpu() for v in stats.values()]])
    for cpu, cuda in zip(*results, strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: nt_xent_loss(torch.randn(4, 3), torch.randn(4, 2)), "equal shapes"),
        (lambda: nt_xent_loss(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
        (lambda: nt_xent_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0), "temperature"),
        (lambda: info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 2)), "queue"),
        (lambda: info_nce_loss(torch.randn(4, 3), torch.randn(3, 3), torch.randn(5, 3)), "equal shapes"),
        (lambda: byol_loss(*(torch.randn(4, 3),) * 3, torch.randn(4, 2)), "t2"),
        (lambda: vicreg_loss(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
        (lambda: byol_momentum(1, 0), "total_steps"),
    ],
)
def test_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_docs_table_matches_the_defaults():
    page = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    fix = "docs/methods.md differs from the registry: paste what `python -m twinray.train.methods.table` prints"
    for block in (defaults_table, methods_table, sources_text):
        assert block() in page, f"{block.__name__}: {fix}"
    for key, method in METHODS.items():
        assert method.sources, key  # every method says where its values come from
    assert METHODS["moco"].lr(128) == pytest.approx(0.015)  # the official README's batch-128 value
    assert METHODS["byol"].lr(4096) == pytest.approx(3.2)  # BYOL's 0.2 x 4096 / 256
    assert METHODS["barlow"].lr(512) == METHODS["barlow"].lr(128)  # no rule: not scaled


def test_the_registry_is_where_a_method_lives():
    """Each --method is one module's SPEC: the config's method fields, the --method choices and the method a run
    trains come from it (docs/methods.md, "Adding a method")."""
    from dataclasses import fields

    from twinray.train.config import CHOICES, METHOD_FIELDS, PretrainConfig
    from twinray.train.methods import METHOD_ONLY, NAMES, SETTINGS, build_method, model_pieces

    assert tuple(METHODS) == NAMES == CHOICES["method"]
    assert set(SETTINGS) <= {f.name for f in fields(PretrainConfig)}
    assert set(METHOD_ONLY) == set(SETTINGS) <= set(METHOD_FIELDS)
    for key, spec in METHODS.items():
        assert spec.method.__module__ == f"twinray.train.methods.{key}", key
        cfg = PretrainConfig(method=key).validate()
        assert type(build_method(cfg, None, 10)) is spec.method
        assert model_pieces(cfg)["projector_batch_norm"] is spec.projector_batch_norm
        for s in spec.settings:
            assert getattr(cfg, s.name) == s.default, (key, s.name)


def test_the_registry_refuses_a_setting_it_cannot_hold():
    """A setting listed twice by one method, one without its default (Setting.at), or one named like a config
    field (which would replace that field for every method) is a TypeError at import, naming the method."""
    from twinray.train.config import method_settings
    from twinray.train.methods import _settings
    from twinray.train.methods.spec import TEMPERATURE

    simclr = METHODS["simclr"]
    twice = dataclasses.replace(simclr, settings=(TEMPERATURE.at(0.1), TEMPERATURE.at(0.2)))
    with pytest.raises(TypeError, match="^simclr lists the setting temperature twice$"):
        _settings({"simclr": twice})
    with pytest.raises(TypeError, match=r"^simclr's setting temperature has no default: give it one with \.at"):
        _settings({"simclr": dataclasses.replace(simclr, settings=(TEMPERATURE,))})

    class Clash:
        warmup_epochs: float = 0.0
        lambd: float = 1.0  # Barlow Twins' setting

    with pytest.raises(TypeError, match="^the setting lambd of barlow is named like Clash's field lambd"):
        method_settings(after="warmup_epochs")(Clash)


def test_the_registry_names_a_module_whose_spec_it_cannot_use(monkeypatch):
    """A module without SPEC, with another key, or whose SPEC holds an instance instead of the Method class is a
    TypeError naming the file, not an error from deep inside issubclass."""
    import sys
    import types

    from twinray.train.methods import _register

    simclr = METHODS["simclr"]
    cases = {
        "nospec": (None, "must define SPEC = MethodSpec"),
        "wrongkey": (simclr, "must define SPEC = MethodSpec"),
        "instance": (dataclasses.replace(simclr, key="instance", method=simclr.method(0.1)), "MethodBase subclass"),
    }
    for name, (spec, needle) in cases.items():
        module = types.ModuleType(f"twinray.train.methods.{name}")
        if spec is not None:
            module.SPEC = spec
        monkeypatch.setitem(sys.modules, module.__name__, module)
        with pytest.raises(TypeError, match=f"^train/methods/{name}.py.*{needle}"):
            _register((name,))
    assert list(_register(("simclr",))) == ["simclr"]  # the real module still registers


def test_the_tables_command_prints_what_the_page_holds():
    """`python -m twinray.train.methods.table`, the command that "Adding a method" says to run, prints the three
    blocks the docs test compares."""
    from twinray.train.methods import table

    out = subprocess.run(
        [sys.executable, "-m", "twinray.train.methods.table"], capture_output=True, text=True, check=True
    ).stdout
    for block in (table.methods_table(), table.defaults_table(), table.sources_text()):
        assert block in out
