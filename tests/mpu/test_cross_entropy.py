import torch
import torch.nn.functional as F

import mpu


def test_matches_torch_cross_entropy_values_and_grads():
    gen = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 7, 50, generator=gen)).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=gen)
    weights = torch.rand(3, 7, generator=gen)
    loss = mpu.vocab_parallel_cross_entropy(logits, labels)
    assert loss.shape == (3, 7) and loss.dtype == torch.float32
    (loss * weights).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 50), labels.view(-1), reduction="none").view(3, 7)
    (ref * weights).sum().backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_stable_for_huge_logits_and_half_input():
    logits = torch.tensor([[[1e4, 0.0, -1e4]]])
    loss = mpu.vocab_parallel_cross_entropy(logits, torch.tensor([[1]]))
    torch.testing.assert_close(loss, torch.tensor([[1e4]]))
    half = torch.randn(2, 3, 8).half()
    labels = torch.randint(0, 8, (2, 3))
    out = mpu.vocab_parallel_cross_entropy(half, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, F.cross_entropy(half.float().view(-1, 8), labels.view(-1), reduction="none")
                               .view(2, 3))


def test_shape_mismatch_is_an_error():
    import pytest
    with pytest.raises(ValueError, match="logits"):
        mpu.vocab_parallel_cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
