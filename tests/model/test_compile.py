"""``--compile`` (EncDecModel.compile_training_forward): the compiled training forward computes what the eager one
does, keeps the linear layers in oneDNN on CPU (the custom op), and leaves evaluation eager."""
import pytest
import torch

from model import EncDecConfig, EncDecModel
from mpu import fast_linear

from hf_reference import randomize_

CFG = dict(d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, vocab_size=64)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(enc_input_ids=batch[0], enc_attention_mask=batch[1], dec_input_ids=batch[2])
    loss = torch.nn.functional.cross_entropy(out["lm_logits"].flatten(0, 1), batch[3].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(not fast_linear._ENABLED, reason="oneDNN linear unavailable or disabled")
def test_compiled_training_forward_equals_eager_and_keeps_onednn(monkeypatch):
    torch.manual_seed(0)
    eager = EncDecModel(EncDecConfig(**CFG), parallel_output=False).train()
    randomize_(eager, 1)
    compiled = EncDecModel(EncDecConfig(**CFG), parallel_output=False).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_training_forward()
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randint(1, 64, (2, 9), generator=gen), torch.ones(2, 9, dtype=torch.long),
             torch.randint(1, 64, (2, 5), generator=gen), torch.randint(1, 64, (2, 5), generator=gen))
    calls = []
    real = fast_linear._onednn
    monkeypatch.setattr(fast_linear, "_onednn", lambda *a: calls.append(1) or real(*a))
    loss_c, grads_c = _loss_and_grads(compiled, batch)
    assert calls, "the compiled graph did not call the oneDNN linear op"
    loss_e, grads_e = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoint names unchanged
    # Evaluation stays eager: the compiled function is not entered in eval mode.
    compiled.eval()
    monkeypatch.setattr(compiled, "_compiled_forward", lambda *a: pytest.fail("eval went through the compiled fn"))
    with torch.no_grad():
        compiled(enc_input_ids=batch[0], dec_input_ids=batch[2])
