"""All two-rank mpu checks in one gloo spawn: groups, mappings, layers vs serial (and the explicit group),
vocab-parallel cross-entropy vs F.cross_entropy, RNG streams per MP rank."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import mpu
from mp_harness import run_distributed


def _check_mappings(rank):
    x = torch.arange(8.0).view(2, 4).requires_grad_()
    part = mpu.scatter_to_model_parallel_region(x)
    torch.testing.assert_close(part, x.detach()[:, 2 * rank:2 * rank + 2])
    (part * (rank + 1)).sum().backward()  # backward gathers: [1, 1, 2, 2] on both ranks
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2]]))

    local = torch.full((2, 1), float(rank), requires_grad=True)
    full = mpu.gather_from_model_parallel_region(local)
    torch.testing.assert_close(full, torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    (full * torch.tensor([3.0, 5.0])).sum().backward()  # backward keeps this rank's slice
    torch.testing.assert_close(local.grad, torch.full((2, 1), [3.0, 5.0][rank]))

    y = torch.ones(3, requires_grad=True)
    (mpu.copy_to_model_parallel_region(y) * (rank + 1)).sum().backward()  # backward all-reduces: 1 + 2
    torch.testing.assert_close(y.grad, torch.full((3,), 3.0))

    z = torch.ones(3, requires_grad=True)
    reduced = mpu.reduce_from_model_parallel_region(z * (rank + 1))
    torch.testing.assert_close(reduced, torch.full((3,), 3.0))
    reduced.sum().backward()  # backward is the identity
    torch.testing.assert_close(z.grad, torch.full((3,), float(rank + 1)))


def _master(seed, shape, std=0.1):
    torch.manual_seed(seed)
    master = torch.empty(shape)
    mpu.init_method_normal(std)(master)
    return master


def _check_layers(rank):
    init = mpu.init_method_normal(0.1)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))  # same on both ranks

    # fused [Q; K; V] weight, stride 3: rank r holds [Q_r; K_r; V_r]
    master = _master(0, (12, 8))
    torch.manual_seed(0)
    col = mpu.ColumnParallelLinear(8, 12, init_method=init, stride=3)
    q, k, v = master.split(4, dim=0)
    expected = torch.cat([q[2 * rank:2 * rank + 2], k[2 * rank:2 * rank + 2], v[2 * rank:2 * rank + 2]])
    torch.testing.assert_close(col.weight.data, expected, rtol=0, atol=0)
    xin = x.clone().requires_grad_()
    out = col(xin)
    torch.testing.assert_close(out, F.linear(x, expected))
    out.pow(2).sum().backward()  # input grad all-reduced over both ranks' heads
    xs = x.clone().requires_grad_()
    F.linear(xs, master).pow(2).sum().backward()
    torch.testing.assert_close(xin.grad, xs.grad)

    # row-parallel with scattered input equals the serial linear, weight grad is the column slice
    master = _master(1, (5, 8))
    torch.manual_seed(1)
    row = mpu.RowParallelLinear(8, 5, init_method=init, input_is_parallel=False)
    torch.testing.assert_close(row.weight.data, master[:, 4 * rank:4 * rank + 4], rtol=0, atol=0)
    xin = x.clone().requires_grad_()
    out = row(xin)
    serial_w = master.clone().requires_grad_()
    xs = x.clone().requires_grad_()
    ref = F.linear(xs, serial_w)
    torch.testing.assert_close(out, ref)
    out.pow(2).sum().backward()
    ref.pow(2).sum().backward()
    torch.testing.assert_close(row.weight.grad, serial_w.grad[:, 4 * rank:4 * rank + 4])
    torch.testing.assert_close(xin.grad, xs.grad)

    # vocab-parallel embedding: rows [5r, 5r + 5)
    master = _master(2, (10, 4))
    torch.manual_seed(2)
    emb = mpu.VocabParallelEmbedding(10, 4, init_method=init)
    ids = torch.tensor([[0, 9, 4, 5, 5]])
    out = emb(ids)
    torch.testing.assert_close(out, F.embedding(ids, master))
    out.sum().backward()
    serial = master.clone().requires_grad_()
    F.embedding(ids, serial).sum().backward()
    torch.testing.assert_close(emb.weight.grad, serial.grad[5 * rank:5 * rank + 5])


def _check_cross_entropy(rank):
    gen = torch.Generator().manual_seed(3)
    full = 4 * torch.randn(2, 5, 12, generator=gen)
    labels = torch.randint(0, 12, (2, 5), generator=gen)
    weights = torch.rand(2, 5, generator=gen)
    local = full[..., 6 * rank:6 * rank + 6].clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(local, labels)
    (loss * weights).sum().backward()
    serial = full.clone().requires_grad_()
    ref = F.cross_entropy(serial.view(-1, 12), labels.view(-1), reduction="none").view(2, 5)
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(local.grad, serial.grad[..., 6 * rank:6 * rank + 6])


def _check_rng(rank, world_size):
    mpu.model_parallel_seed(42)
    default = torch.rand(4)
    with mpu.get_rng_tracker().fork():
        sharded = torch.rand(4)
    draws = [torch.empty(8) for _ in range(world_size)]
    dist.all_gather(draws, torch.cat([default, sharded]))
    torch.testing.assert_close(draws[0][:4], draws[1][:4])  # replicated stream: same on both MP ranks
    assert not torch.equal(draws[0][4:], draws[1][4:])  # model-parallel stream: seed + 2718 + mp_rank
    mpu.get_rng_tracker().reset()


def _check_explicit_group(rank):
    """With mpu uninitialised, a layer given an explicit group shards over it (the group argument is used)."""
    mpu.destroy_model_parallel()
    assert mpu.get_model_parallel_world_size() == 1
    group = dist.new_group([0, 1])
    torch.manual_seed(4)
    col = mpu.ColumnParallelLinear(3, 6, init_method=mpu.init_method_normal(0.1), group=group)
    assert col.weight.shape == (3, 3)
    full = mpu.gather_from_model_parallel_region(col(torch.ones(1, 3)), group=group)
    torch.testing.assert_close(full, F.linear(torch.ones(1, 3), _master(4, (6, 3))))


def check_two_ranks(rank, world_size):
    mpu.initialize_model_parallel(2)
    assert mpu.get_model_parallel_ranks() == [0, 1] and mpu.get_data_parallel_ranks() == [rank]
    assert (mpu.get_model_parallel_rank(), mpu.get_model_parallel_world_size()) == (rank, 2)
    assert (mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()) == (0, 1)
    _check_mappings(rank)
    _check_layers(rank)
    _check_cross_entropy(rank)
    _check_rng(rank, world_size)
    _check_explicit_group(rank)
    # MP 1 x DP 2 on the same world
    mpu.initialize_model_parallel(1)
    assert mpu.get_model_parallel_ranks() == [rank] and mpu.get_data_parallel_ranks() == [0, 1]
    assert mpu.get_data_parallel_rank() == rank


def test_mpu_on_two_gloo_ranks():
    run_distributed(2, check_two_ranks)
