"""train/momentum.py (EMA encoder, MoCo's queue, shuffled BatchNorm) and train/heads.py (heads, BYOL's predictor)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from twinray.train.heads import build_head, build_predictor
from twinray.train.momentum import KeyQueue, MomentumEncoder, shuffled_forward


def _net(seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_momentum_encoder_is_an_ema_copy():
    online = _net()
    target = MomentumEncoder(online)
    start = {k: v.clone() for k, v in target.module.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in online.state_dict().items())  # starts as a copy
    assert not any(p.requires_grad for p in target.parameters())
    assert {k.removeprefix("module.") for k in target.state_dict()} == set(online.state_dict())

    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.fill_(7.0)
    target.update(online, 0.9)
    for (name, t), o in zip(target.module.named_parameters(), online.parameters(), strict=True):
        expected = 0.9 * start[name].double() + 0.1 * o.detach().double()
        torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(target.module[1].running_mean, start["1.running_mean"])  # buffers are not averaged

    before = [p.clone() for p in target.parameters()]
    target.update(online, 1.0)  # m = 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(before, target.parameters(), strict=True))
    target.update(online, 0.0)  # m = 0: the online weights
    assert all(torch.equal(t, o) for t, o in zip(target.module.parameters(), online.parameters(), strict=True))


def test_momentum_encoder_forward_has_no_graph_and_rejects_bad_input():
    online = _net()
    target = MomentumEncoder(online)
    out = target(torch.randn(5, 4, requires_grad=True))
    assert not out.requires_grad and out.shape == (5, 3)
    with pytest.raises(ValueError, match="momentum must be in"):
        target.update(online, 1.5)
    with pytest.raises(ValueError, match="do not match"):
        target.update(nn.Linear(4, 3), 0.5)


def test_key_queue_state_and_wraparound():
    queue = KeyQueue(size=5, dim=3, generator=torch.Generator().manual_seed(0))
    assert set(queue.state_dict()) == {"keys", "ptr"}
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(5))
    start = queue.keys.clone()
    k = torch.tensor([[3.0, 0, 4], [0, 2, 0], [1, 1, 1]])
    queue.enqueue(k)
    torch.testing.assert_close(queue.keys[:3], torch.nn.functional.normalize(k, dim=1))
    assert queue.ptr.item() == 3 and torch.equal(queue.keys[3:], start[3:])
    queue.enqueue(2 * k)  # rows 3, 4, then 0
    assert queue.ptr.item() == 1
    torch.testing.assert_close(queue.keys[[3, 4, 0]], torch.nn.functional.normalize(k, dim=1))

    restored = KeyQueue(size=5, dim=3)
    restored.load_state_dict(queue.state_dict())  # what a checkpoint restores
    assert torch.equal(restored.keys, queue.keys) and restored.ptr.item() == 1
    with pytest.raises(ValueError, match="larger than the queue"):
        queue.enqueue(torch.randn(6, 3))
    with pytest.raises(ValueError, match="N x 3"):
        queue.enqueue(torch.randn(2, 4))


def test_shuffled_forward_restores_order_and_uses_chunk_statistics():
    torch.manual_seed(1)
    x = torch.randn(10, 4)
    linear = nn.Linear(4, 3)
    torch.testing.assert_close(shuffled_forward(linear, x, chunk=4), linear(x))  # no BN: only the order moves

    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False)).train()
    out = shuffled_forward(bn, x, chunk=4, generator=torch.Generator().manual_seed(2))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    expected = torch.empty(10, 3)
    for part in order.tensor_split(2):  # 10 // 4 = 2 chunks of 5 rows, each its own BN batch
        expected[part] = bn(x[part])
    torch.testing.assert_close(out, expected)
    assert (out - bn(x)).abs().max() > 1e-2  # not the whole batch's statistics
    for part in order.tensor_split(2):  # each chunk is standardised over itself
        torch.testing.assert_close(out[part].mean(0), torch.zeros(3), rtol=0, atol=1e-5)

    pair = shuffled_forward(lambda v: (v, 2 * v), x, chunk=3)  # tuple outputs, as BarlowTwins returns
    torch.testing.assert_close(pair[0], x)
    torch.testing.assert_close(pair[1], 2 * x)


def test_heads_and_predictor():
    bn_head = build_head(512, "2048-128")
    assert [type(m).__name__ for m in bn_head] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert bn_head[0].weight.shape == (2048, 512) and bn_head[-1].weight.shape == (128, 2048)
    moco_head = build_head(512, "2048-128", batch_norm=False)
    assert [type(m).__name__ for m in moco_head] == ["Linear", "ReLU", "Linear"]
    assert moco_head[0].bias is not None and moco_head[-1].out_features == 128
    predictor = build_predictor(256, "4096-256")
    assert predictor[0].in_features == 256 and predictor[-1].out_features == 256
    assert predictor(torch.randn(4, 256)).shape == (4, 256)
    with pytest.raises(ValueError, match="must end with"):
        build_predictor(256, "4096-128")


@pytest.mark.gpu
def test_cuda_pieces_do_not_wait_for_the_device():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    online = _net().cuda()
    target = MomentumEncoder(online)
    queue = KeyQueue(size=8, dim=3).cuda()
    x = torch.randn(6, 4, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        keys = shuffled_forward(target, x, chunk=3)
        queue.enqueue(keys)
        queue.enqueue(keys)  # wraps around: rows 6, 7, 0..3
        target.update(online, 0.99)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert queue.ptr.item() == 4
    torch.testing.assert_close(queue.keys[[6, 7, 0, 1, 2, 3]], torch.nn.functional.normalize(keys, dim=1))
