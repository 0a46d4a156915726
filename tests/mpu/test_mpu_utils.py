import pytest
import torch

from mpu.utils import check_model_parallel_size, divide, split_tensor_along_last_dim, vocab_range


def test_divide():
    assert divide(12, 4) == 3
    with pytest.raises(ValueError, match="num_heads 10 is not divisible by 4"):
        divide(10, 4, what="num_heads")
    with pytest.raises(ValueError, match="must be >= 1"):
        divide(10, 0)


def test_check_model_parallel_size():
    check_model_parallel_size(4, {"num_heads": 64, "d_ff": 10240, "vocab_size": 26240})
    with pytest.raises(ValueError) as err:
        check_model_parallel_size(3, {"num_heads": 12, "d_ff": 48, "vocab_size": 100})
    assert str(err.value) == ("model-parallel size 3 does not divide vocab_size 100 (the MP size must divide "
                              "num_heads, d_ff and vocab_size); use 1, 2 or 4")
    with pytest.raises(ValueError, match="must be >= 1"):
        check_model_parallel_size(0, {"num_heads": 4})


def test_vocab_range_and_split():
    assert vocab_range(12, 2, 3) == (8, 12)
    parts = split_tensor_along_last_dim(torch.arange(12).view(2, 6), 3)
    assert [p.tolist() for p in parts][1] == [[2, 3], [8, 9]]
