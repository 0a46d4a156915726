"""model/generation at model-parallel size 2 (two gloo ranks on CPU) gives the same tokens and scores as MP 1.

Each rank builds the MP-2 model and loads its shard of the MP-1 model's full weights (split by the SPEC §2 rules),
so the comparison does not depend on the initialisation.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import EncDecModel
from model.generation import generate, score_candidates, score_token_logit
from test_generation import build_tiny_model, encoder_batch, gen_config, pick_eos, tiny_config

WORLD = 2


def shard_of(name: str, full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's slice of a full weight (SPEC §2 split table)."""
    if name.endswith(("word_embeds.weight", "lm_head.weight", "project_q.weight", "wi_0.weight", "wi_1.weight")):
        return full.chunk(world, dim=0)[rank]  # rows, contiguous
    if name.endswith(("self_attn.project.weight", "project_kv.weight")):
        parts = 3 if name.endswith("project.weight") else 2  # fused [Q; K; V] / [K; V]: stride 3 / 2
        return torch.cat([p.chunk(world, dim=0)[rank] for p in full.chunk(parts, dim=0)], dim=0)
    if name.endswith(("dense.weight", "wo.weight", "relative_attention_bias.weight")):
        return full.chunk(world, dim=1)[rank]  # columns (input features / heads)
    return full  # norms: replicated


def run_all(model, eos: int) -> dict:
    """Every decoding mode and the scoring helpers on fixed inputs."""
    ids, mask = encoder_batch(0)
    prefix = torch.tensor([[1, 3]] * ids.size(0))
    batch = {"enc_input_ids": ids, "enc_attention_mask": mask, "dec_input_ids": prefix,
             "cross_attention_mask": mask, "candidate_ids": torch.tensor([[10, 70, 120, -1]] * ids.size(0))}
    return {
        "greedy": generate(model, ids, mask, gen_config(eos)),
        "greedy_ngram": generate(model, ids, mask, gen_config(eos, no_repeat_ngram_size=2, min_length=3)),
        "beam": generate(model, ids, mask, gen_config(eos, num_beams=4, length_penalty=0.8)),
        "sample": generate(model, ids, mask, gen_config(eos, do_sample=True, top_k=30, top_p=0.95, temperature=1.2),
                           generator=torch.Generator().manual_seed(11)),
        "scores": score_candidates(model, batch),
        "token_logit": score_token_logit(model, batch, 70),
    }


def _worker(rank: int, port: int, state_path: str, out_dir: str, eos: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import mpu
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mpu.initialize_model_parallel(WORLD)
        full = torch.load(state_path)
        results = {}
        for parallel_output in (True, False):
            model = EncDecModel(tiny_config(), parallel_output=parallel_output)
            model.load_state_dict({k: shard_of(k, v, rank, WORLD) for k, v in full.items()}, strict=True)
            results[parallel_output] = run_all(model.eval(), eos)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        mpu.destroy_model_parallel()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mp2_generation_equals_mp1(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_tiny_model(0)
        eos = pick_eos(model, *encoder_batch(0))
        expected = run_all(model, eos)
    finally:
        torch.set_num_threads(threads)
    torch.save(model.state_dict(), tmp_path / "full.pt")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "full.pt"), str(tmp_path), eos), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for parallel_output, got in results.items():
            where = f"rank {rank}, parallel_output={parallel_output}"
            for key in ("greedy", "greedy_ngram", "beam", "sample"):
                assert torch.equal(got[key], expected[key]), f"{key} differs at {where}"
            assert torch.equal(got["scores"][0], expected["scores"][0]), where
            torch.testing.assert_close(got["scores"][1], expected["scores"][1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got["token_logit"], expected["token_logit"], rtol=1e-4, atol=1e-4)
