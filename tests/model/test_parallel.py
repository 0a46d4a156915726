"""EncDecModel at MP 2 / 4 (gloo) equals MP 1 from the same seed: init, logits, loss and gradients.

One spawn per world size runs every check. The MP-1 reference is built in the same process before the groups are
initialised (uninitialised mpu = MP 1). Shards are merged back with the SPEC §2 split rules, written out here
independently of the model code.
"""
import pytest
import torch
import torch.distributed as dist

import mpu
from model import EncDecConfig, EncDecModel
from mp_harness import run_distributed

CFG = dict(d_model=32, d_ff=48, d_kv=8, num_heads=8, num_layers=2, num_decoder_layers=3, vocab_size=64,
           init_method_std=0.1, dropout_rate=0.0)
TOL = 1e-5
SEED = 1234


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full tensor from the MP shards of parameter ``name`` (rank order)."""
    if name.endswith("self_attn.project.weight") or name.endswith("project_kv.weight"):
        parts = 3 if name.endswith("project.weight") else 2  # rank r holds [Q_r; K_r; V_r] / [K_r; V_r]
        pieces = [s.chunk(parts, dim=0) for s in shards]
        return torch.cat([pieces[r][j] for j in range(parts) for r in range(len(shards))], dim=0)
    if any(key in name for key in ("word_embeds", "lm_head", "project_q", "wi_0", "wi_1")):
        return torch.cat(shards, dim=0)  # rows
    if any(key in name for key in ("relative_attention_bias", ".dense.", ".wo.")):
        return torch.cat(shards, dim=1)  # columns
    for shard in shards[1:]:  # replicated: norms, prompt
        torch.testing.assert_close(shard, shards[0], rtol=0, atol=0, msg=f"replicated {name} differs across ranks")
    return shards[0]


def gather_full(name: str, tensor: torch.Tensor) -> torch.Tensor:
    group = mpu.get_model_parallel_group()
    shards = [torch.empty_like(tensor) for _ in range(mpu.get_model_parallel_world_size())]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return merge(name, shards)


def _inputs():
    gen = torch.Generator().manual_seed(7)
    enc = torch.randint(0, 64, (2, 11), generator=gen)
    enc[0, :3] = torch.tensor([-1, -2, -3])  # soft prompt positions
    enc_mask = torch.ones(2, 11, dtype=torch.long)
    enc_mask[1, 7:] = 0
    dec = torch.randint(0, 64, (2, 6), generator=gen)
    labels = torch.randint(0, 64, (2, 6), generator=gen)
    loss_mask = torch.ones(2, 6)
    loss_mask[1, 4:] = 0
    return enc, enc_mask, dec, labels, loss_mask


def _loss_and_grads(model, parallel: bool):
    enc, enc_mask, dec, labels, loss_mask = _inputs()
    out = model(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)
    logits = out["lm_logits"]
    token_loss = mpu.vocab_parallel_cross_entropy(logits, labels)  # [B, Ld]
    loss = ((token_loss * loss_mask).sum(1) / loss_mask.sum(1)).mean()  # the original's normalisation
    loss.backward()
    full_logits = mpu.gather_from_model_parallel_region(logits.detach()) if parallel else logits.detach()
    grads = {n: (gather_full(n, p.grad) if parallel else p.grad) for n, p in model.named_parameters()}
    return full_logits, loss.detach(), grads


def check_model_parallel(rank, world_size, mp_size, dp_layout):
    cfg = EncDecConfig(**CFG)
    prompt = {"enc": {"prompt_len": 3}}
    torch.manual_seed(SEED)
    serial = EncDecModel(cfg, parallel_output=False, prompt_config=prompt)  # mpu not initialised: MP 1
    ref_logits, ref_loss, ref_grads = _loss_and_grads(serial, parallel=False)

    mpu.initialize_model_parallel(mp_size)
    torch.manual_seed(SEED)
    model = EncDecModel(cfg, prompt_config=prompt)
    serial_params = dict(serial.named_parameters())
    for name, param in model.named_parameters():  # init does not depend on the MP size
        torch.testing.assert_close(gather_full(name, param.detach()), serial_params[name].detach(),
                                   rtol=0, atol=0, msg=name)
    logits, loss, grads = _loss_and_grads(model, parallel=True)
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=TOL)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=TOL, atol=TOL, msg=name)

    # parallel_output=False gathers inside the model
    gathered = EncDecModel(cfg, parallel_output=False, prompt_config=prompt)
    gathered.load_state_dict(model.state_dict())
    enc, enc_mask, dec, *_ = _inputs()
    with torch.no_grad():
        full = gathered(enc, enc_attention_mask=enc_mask, dec_input_ids=dec, cross_attention_mask=enc_mask)
    torch.testing.assert_close(full["lm_logits"], ref_logits, rtol=0, atol=TOL)

    if dp_layout:
        _check_dp2_mp2(rank)


def _check_dp2_mp2(rank):
    """World 4 as DP 2 x MP 2: MP groups are consecutive ranks, DP groups stride by the MP size."""
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(2)
    assert mpu.get_model_parallel_ranks() == ([0, 1] if rank < 2 else [2, 3])
    assert mpu.get_data_parallel_ranks() == ([0, 2] if rank % 2 == 0 else [1, 3])
    assert (mpu.get_model_parallel_rank(), mpu.get_data_parallel_rank()) == (rank % 2, rank // 2)
    assert mpu.get_model_parallel_src_rank() == rank - rank % 2
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=mpu.get_model_parallel_group())
    assert total.item() == (1.0 if rank < 2 else 5.0)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=mpu.get_data_parallel_group())
    assert total.item() == (2.0 if rank % 2 == 0 else 4.0)


def check_mp_refusal(rank, world_size):
    mpu.initialize_model_parallel(world_size)
    with pytest.raises(ValueError, match=f"model-parallel size {world_size} does not divide num_heads 4"):
        EncDecModel(EncDecConfig(**{**CFG, "num_heads": 4, "d_kv": 8}))


def test_mp2_equals_mp1():
    run_distributed(2, check_model_parallel, 2, False)


def test_mp4_equals_mp1_and_dp2_mp2_layout():
    run_distributed(4, check_model_parallel, 4, True)


@pytest.mark.slow
def test_mp8_smoke():
    run_distributed(8, check_model_parallel, 8, False)
    run_distributed(8, check_mp_refusal)
