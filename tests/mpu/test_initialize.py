"""Uninitialised behaviour (MP 1 / DP 1, no torch.distributed); the group layouts run in test_mpu_gloo.py."""
import pytest
import torch.distributed as dist

import mpu


def test_uninitialised_is_mp1_dp1_without_distributed():
    assert not dist.is_initialized()
    assert not mpu.model_parallel_is_initialized()
    assert mpu.get_model_parallel_group() is None and mpu.get_data_parallel_group() is None
    assert (mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()) == (1, 0)
    assert (mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()) == (1, 0)
    assert mpu.get_model_parallel_src_rank() == 0


def test_initialize_needs_distributed():
    with pytest.raises(RuntimeError, match="torch.distributed"):
        mpu.initialize_model_parallel(2)
