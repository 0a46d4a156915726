"""Layers at MP 1 equal plain torch; their init is a slice of one master draw (two-rank checks: test_mpu_gloo.py)."""
import torch
import torch.nn.functional as F

import mpu


def test_mp1_layers_are_plain_linear_and_embedding():
    init = mpu.init_method_normal(0.1)
    torch.manual_seed(0)
    col = mpu.ColumnParallelLinear(6, 9, init_method=init, stride=3)
    torch.manual_seed(0)
    master = torch.empty(9, 6)
    init(master)
    torch.testing.assert_close(col.weight.data, master)  # stride is irrelevant at MP 1
    x = torch.randn(2, 6)
    torch.testing.assert_close(col(x), F.linear(x, master))
    row = mpu.RowParallelLinear(9, 4, init_method=init)
    h = torch.randn(2, 9)
    torch.testing.assert_close(row(h), F.linear(h, row.weight))
    emb = mpu.VocabParallelEmbedding(10, 4, init_method=init)
    ids = torch.tensor([[0, 9, 3]])
    torch.testing.assert_close(emb(ids), F.embedding(ids, emb.weight))


def test_layers_compute_in_the_input_dtype():
    row = mpu.RowParallelLinear(4, 3, init_method=mpu.init_method_normal(0.1)).half()
    out = row(torch.randn(2, 4))  # fp32 input, fp16 weight: fp32 matmul
    assert out.dtype == torch.float32
