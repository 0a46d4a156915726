"""The mappings on one rank are identities (forward and backward); the two-rank behaviour is in test_mpu_gloo.py."""
import pytest
import torch

import mpu


@pytest.mark.parametrize("fn", [mpu.copy_to_model_parallel_region, mpu.reduce_from_model_parallel_region,
                                mpu.scatter_to_model_parallel_region, mpu.gather_from_model_parallel_region])
def test_single_rank_identity(fn):
    x = torch.randn(2, 3, 4, requires_grad=True)
    y = fn(x)
    torch.testing.assert_close(y, x)
    w = torch.randn(2, 3, 4)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w)
