"""One training step of a ~14M-parameter model (about 55 MB in fp32) under DeepSpeed, full fine-tuning or
prompt tuning with fix_model, then a memory figure: bytes held by gradients and by the optimizer (its state
and any master copies), and the process's peak RSS. Run in a fresh process per mode, so peaks do not mix:

    python tests/prompt/memory_probe.py {full,prompt} [--zero-stage 0|1|2] [--bf16]

Prints one JSON line. Used by tests/prompt/test_prompt_memory.py.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

# d_model 256, 4+4 layers, an 8k vocab: 13.6M parameters, 54 MB of fp32 weights.
CONFIG = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4, vocab_size=8192,
              dropout_rate=0.0, feed_forward_proj="gated-gelu", init_method_std=0.02)
PROMPT_LEN = 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS of this process's own memory. Not ru_maxrss: Linux carries the parent's high-water mark
    into a vfork+exec child (subprocess does that), so a probe launched from a large pytest process read the
    parent's peak instead of its own (seen after torch.compile tests had grown the pytest process)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tensors_in(obj, seen_objs: set, depth: int = 0):
    """Every tensor reachable from `obj` through attributes, dicts, lists and tuples (modules excluded)."""
    if depth > 6 or id(obj) in seen_objs:
        return
    seen_objs.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(k, seen_objs, depth + 1)
            yield from tensors_in(v, seen_objs, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from tensors_in(v, seen_objs, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch", "training"):
        yield from tensors_in(vars(obj), seen_objs, depth + 1)


def storage_key(t: torch.Tensor):
    return t.untyped_storage().data_ptr()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["full", "prompt"])
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()

    import deepspeed
    import mpu
    from model import EncDecConfig, EncDecModel
    from training.engine import OptimSettings, build_ds_config, build_engine
    from training.prompt_tuning import PROMPT_KEY, set_trainable
    from data_utils.prompt import PromptConfig

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29517")})
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    mpu.initialize_model_parallel(1)
    torch.manual_seed(0)

    prompt = args.mode == "prompt"
    raw = {"init_scratch": False, "fix_model": True,
           "enc": {"prompt_len": PROMPT_LEN, "init_tokens": "", "default_init_token": "<mask>"},
           "dec": {"prompt_len": 0}}
    prompt_cfg = PromptConfig.from_dict(raw) if prompt else None
    model = EncDecModel(EncDecConfig(**CONFIG), prompt_config=raw if prompt else None)
    if args.bf16:
        model.bfloat16()
    set_trainable(model, prompt_cfg)
    params = dict(model.named_parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in params.values())
    trainable_bytes = sum(t.numel() * t.element_size() for t in params.values() if t.requires_grad)
    param_storages = {storage_key(t) for t in params.values()}

    s = OptimSettings(lr=1e-3, weight_decay=0.01, clip_grad=1.0, micro_batch_size=4, grad_acc_steps=1, dp_size=1,
                      fp16=False, bf16=args.bf16, warmup_steps=0, decay_steps=10, decay_style="constant")
    ds_config = build_ds_config(None, s)
    ds_config["zero_optimization"] = {"stage": args.zero_stage}
    frozen_before = {n: t.detach().clone() for n, t in params.items() if not t.requires_grad}
    prompt_before = params[PROMPT_KEY].detach().clone() if prompt else None
    rss_before = rss_bytes()
    engine, optimizer, _ = build_engine(model, s, ds_config, prompt_only=prompt)

    gen = torch.Generator().manual_seed(1)
    enc = torch.randint(10, CONFIG["vocab_size"], (4, 48), generator=gen)
    if prompt:
        enc[:, :PROMPT_LEN] = -torch.arange(1, PROMPT_LEN + 1)
    dec = torch.randint(10, CONFIG["vocab_size"], (4, 8), generator=gen)
    for _ in range(2):  # two steps: optimizer state exists after the first
        logits = engine(enc_input_ids=enc, dec_input_ids=dec)["lm_logits"].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), dec.reshape(-1))
        engine.backward(loss)
        # Gradients exist between backward and step (DeepSpeed frees them in step's zero_grad).
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in params.values() if t.grad is not None)
        frozen_with_grad = [n for n, t in params.items() if not t.requires_grad and t.grad is not None]
        engine.step()
    seen, opt_bytes = set(), 0
    for t in tensors_in(optimizer, set()):
        key = storage_key(t)
        if key in seen or key in param_storages or t.device.type == "meta":
            continue
        seen.add(key)
        opt_bytes += t.untyped_storage().nbytes()
    frozen_changed = [n for n, t in frozen_before.items() if not torch.equal(t, params[n].detach())]
    print(json.dumps({
        "mode": args.mode, "zero_stage": args.zero_stage, "bf16": args.bf16,
        "params": sum(t.numel() for t in params.values()), "weight_bytes": weight_bytes,
        "trainable_bytes": trainable_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": opt_bytes,
        "frozen_with_grad": frozen_with_grad, "optimizer_type": type(optimizer).__name__,
        "rss_before_engine": rss_before, "rss_after_step": rss_bytes(), "peak_rss": peak_rss_bytes(),
        "prompt_requires_grad": bool(prompt and params[PROMPT_KEY].requires_grad),
        "trainable_numel": sum(t.numel() for t in params.values() if t.requires_grad),
        "frozen_checked": len(frozen_before), "frozen_changed": frozen_changed,
        "prompt_changed": bool(prompt and not torch.equal(prompt_before, params[PROMPT_KEY].detach())),
    }))


if __name__ == "__main__":
    main()
