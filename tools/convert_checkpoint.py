"""Convert CPM-2 checkpoints between model-parallel sizes and to / from Hugging Face T5 (SPEC §4).

    # re-shard the released 4-way Chinese CPM-2 for 8 GPUs (fp16 kept, tracker written)
    python tools/convert_checkpoint.py --load cpm2 --save cpm2_mp8 --target-mp 8
    # to a transformers T5ForConditionalGeneration directory
    python tools/convert_checkpoint.py --load cpm2 --save cpm2_hf --to-hf --model-config configs/model/cpm2_config.json
    # any T5 v1.1 / mT5 directory to CPM-2 shards (+ model_config.json beside them)
    python tools/convert_checkpoint.py --load mt5-base --save mt5_cpm2 --from-hf --target-mp 2

Re-sharding streams: each output shard is built from the input shards that overlap it, read one at a time
(memory-mapped), written and freed, so the peak is about one input shard plus one output shard. HF
conversion needs the full model once. Nothing is rounded: without `--dtype` round trips are bit-exact.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tqdm import tqdm

from model.checkpoint import model_states
from model.checkpoint_hf import (TOKEN_ROLES, cpm2_config_from_hf, full_to_hf, hf_config_for, hf_to_full,
                                 read_hf_state_dict, sentinel_roles, write_hf_state_dict)
from model.checkpoint_io import (SHARD_PATTERN, atomic_torch_save, atomic_write_text, find_shards, iteration_dir,
                                 read_model_states, read_tracker, shard_name, write_tracker)
from model.sharding import (WORD_EMBED_ALIASES, copy_overlap, drop_aliases, full_shape, overlapping_ranks,
                            shard_shape, split_full, split_rule_for)

logger = logging.getLogger("convert_checkpoint")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None or not t.is_floating_point() else t.to(dtype)


def _shards(load: Path, iteration: str | None) -> tuple[int | str, list[Path]]:
    it: int | str = read_tracker(load) if iteration is None else (int(iteration) if iteration.isdigit() else iteration)
    return it, find_shards(iteration_dir(load, it))


def _check_target(save: Path, iteration: int | str, load: Path) -> None:
    """Refuse to mix new shards with old ones (a stale mp_rank_07 would make the result unloadable)."""
    out = save / str(iteration)
    if save.resolve() == load.resolve():
        raise ValueError(f"--save {save} is the --load directory; write the conversion somewhere else")
    if out.is_dir() and any(SHARD_PATTERN.fullmatch(p.name) for p in out.iterdir()):
        raise ValueError(f"{out} already holds mp_rank_XX_model_states.pt files; choose an empty --save")


def reshard(load: Path, save: Path, target_mp: int | None, *, dtype: torch.dtype | None = None,
            iteration: str | None = None, progress: bool = True) -> list[Path]:
    """CPM-2 layout -> CPM-2 layout at `target_mp` ranks; top-level keys kept, `mp_world_size` updated."""
    it, paths = _shards(load, iteration)
    _check_target(save, it, load)
    q = len(paths)
    p = target_mp or q
    written: list[Path] = []
    with tqdm(total=sum(len(overlapping_ranks(r, p, q)) for r in range(p)), desc=f"MP {q} -> {p}",
              unit="shard", disable=not progress) as bar:
        for r in range(p):
            out: dict[str, torch.Tensor] = {}
            order: list[str] = []
            bookkeeping: dict[str, Any] = {}
            for s in overlapping_ranks(r, p, q):
                states = read_model_states(paths[s], mmap=True)
                raw = states.pop("module")
                module = drop_aliases(raw, source=str(paths[s]))
                if not order:  # the first source gives key order (aliases included) and bookkeeping
                    order, bookkeeping = list(raw), states
                elif set(raw) != set(order):
                    key = sorted(set(raw) ^ set(order))[0]
                    raise ValueError(f"{paths[s]}: key {key!r} is not in every shard; the shards disagree")
                for name, tensor in module.items():
                    split_rule_for(name, source=str(paths[s]))
                    full = full_shape(name, tensor.shape, q)
                    if name not in out:
                        out[name] = torch.empty(shard_shape(name, full, p, what=str(paths[s])),
                                                dtype=dtype if dtype and tensor.is_floating_point() else tensor.dtype)
                    elif split_rule_for(name).dim is None:
                        continue  # replicated: taken from the first source
                    copy_overlap(name, tensor, s, q, out[name], r, p)
                del states, raw, module
                bar.update()
            # Keep the aliases if the source had them: same tensor, so torch.save stores it once.
            ordered = {k: out["word_embeds.weight"] if k in WORD_EMBED_ALIASES else out[k] for k in order}
            bookkeeping["mp_world_size"] = p
            written.append(atomic_torch_save({"module": ordered, **bookkeeping}, save / str(it) / shard_name(r)))
            del out, ordered
    write_tracker(save, it)
    return written


def _load_full(load: Path, iteration: str | None, dtype: torch.dtype | None,
               progress: bool) -> tuple[dict[str, torch.Tensor], torch.dtype | None]:
    it, paths = _shards(load, iteration)
    q = len(paths)
    full: dict[str, torch.Tensor] = {}
    source_dtype = None
    for s, path in enumerate(tqdm(paths, desc=f"merge {q} shards", unit="shard", disable=not progress)):
        module = drop_aliases(read_model_states(path, mmap=True)["module"], source=str(path))
        for name, tensor in module.items():
            split_rule_for(name, source=str(path))
            if name not in full:
                source_dtype = source_dtype or (tensor.dtype if tensor.is_floating_point() else None)
                full[name] = torch.empty(full_shape(name, tensor.shape, q),
                                         dtype=dtype if dtype and tensor.is_floating_point() else tensor.dtype)
            elif split_rule_for(name).dim is None:
                continue
            copy_overlap(name, tensor, s, q, full[name], 0, 1)
        del module
    return full, source_dtype


def _check_config(full: dict[str, torch.Tensor], cfg: dict[str, Any], config_path: Path) -> None:
    """Cross-check the model config against the tensor shapes, so a wrong --model-config fails loudly."""
    heads, d_kv = int(cfg["num_heads"]), int(cfg["d_kv"])
    checks = {
        "word_embeds.weight": (None, int(cfg["d_model"])),
        "encoder.blocks.0.self_attn.self_attn.project.weight": (3 * heads * d_kv, int(cfg["d_model"])),
        "encoder.blocks.0.self_attn.self_attn.relative_attention_bias.weight":
            (int(cfg.get("relative_attention_num_buckets", 32)), heads),
        "encoder.blocks.0.ff.dense_relu_dense.wi_0.weight": (int(cfg["d_ff"]), int(cfg["d_model"])),
    }
    for name, want in checks.items():
        got = tuple(full[name].shape) if name in full else None
        if got is None or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(f"{config_path}: config does not match the checkpoint: {name} has shape {got}, "
                             f"the config implies {want}")
    for stack, key in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
        want = int(cfg.get(key) or cfg["num_layers"])
        got = sum(1 for k in full if k.startswith(f"{stack}.blocks.") and k.endswith("ff.layer_norm.weight"))
        if got != want:
            raise ValueError(f"{config_path}: {key} is {want} but the checkpoint has {got} {stack} blocks")


def _vocab_roles(vocab_file: Path) -> dict[str, int]:
    """Special-token ids looked up by string in a CPM-2 vocab (one token per line, id = line number)."""
    ids = {tok: i for i, tok in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}
    try:
        return {"pad_token_id": ids["<pad>"], "decoder_start_token_id": ids["<s>"], "eos_token_id": ids["<s_1>"]}
    except KeyError as e:
        raise ValueError(f"{vocab_file}: token {e.args[0]} not found; is it a CPM-2 vocab?") from None


def _token_roles(args: argparse.Namespace, cfg: dict[str, Any], vocab_size: int) -> dict[str, int]:
    """pad / eos / decoder-start ids for the HF config.

    Precedence: the flags; then ids looked up by string in --vocab-file; then ids that --from-hf kept in
    the model config; then the CPM-2 roles (pad 5, <s> 1, eos <s_1> just after the first sentinel).
    """
    flags = {k: getattr(args, k) for k in TOKEN_ROLES if getattr(args, k) is not None}
    if args.vocab_file:
        return {**_vocab_roles(args.vocab_file), **flags}
    known = {**{k: cfg[k] for k in TOKEN_ROLES if isinstance(cfg.get(k), int)}, **flags}
    if len(known) == len(TOKEN_ROLES):
        return known
    return {**sentinel_roles(vocab_size, args.num_sentinels), **known}


def to_hf(load: Path, save: Path, model_config: Path, args: argparse.Namespace) -> Path:
    cfg = json.loads(model_config.read_text(encoding="utf-8"))
    full, source_dtype = _load_full(load, args.iteration, DTYPES.get(args.dtype), not args.no_progress)
    if full.pop("encoder.prompt_embeds.weight", None) is not None:
        logger.warning("dropping encoder.prompt_embeds.weight: a Hugging Face T5 has no soft prompt")
    _check_config(full, cfg, model_config)
    vocab_size = full["word_embeds.weight"].shape[0]
    roles = _token_roles(args, cfg, vocab_size)
    dtype = DTYPES.get(args.dtype) or source_dtype or torch.float32
    hf_config = hf_config_for(cfg, vocab_size=vocab_size, dtype=dtype, **roles)
    hf = full_to_hf(full)
    del full  # the fused originals go; the rest is shared with `hf`
    path = write_hf_state_dict(hf, save)
    atomic_write_text(save / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return path


def from_hf(load: Path, save: Path, args: argparse.Namespace) -> list[Path]:
    config_path = load / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --from-hf expects a Hugging Face model directory")
    cfg = cpm2_config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), source=str(config_path))
    full = hf_to_full(read_hf_state_dict(load), num_layers=cfg["num_layers"],
                      num_decoder_layers=cfg["num_decoder_layers"], source=str(load))
    dtype = DTYPES.get(args.dtype)
    full = {k: _cast(v, dtype) for k, v in full.items()}
    p = args.target_mp or 1
    it: int | str = int(args.save_iteration) if args.save_iteration.isdigit() else args.save_iteration
    _check_target(save, it, load)
    written = []
    for r in tqdm(range(p), desc=f"split to MP {p}", unit="shard", disable=args.no_progress):
        shard = split_full(full, p, r, source=str(load))
        states = model_states(shard, iteration=it, mp_size=p)
        written.append(atomic_torch_save(states, save / str(it) / shard_name(r)))
        del shard, states
    atomic_write_text(save / str(it) / "model_config.json", json.dumps(cfg, indent=2) + "\n")
    write_tracker(save, it)
    return written


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    /proc's VmHWM belongs to the current program image; `ru_maxrss` is not used first because Linux
    carries it over from the parent across fork + exec, so a child started by a big process reports the
    parent's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--load", type=Path, required=True, help="CPM-2 checkpoint dir (with the tracker) or HF dir")
    ap.add_argument("--save", type=Path, required=True, help="output dir")
    ap.add_argument("--target-mp", type=int, default=None, help="output MP size (default: the input's; 1 from HF)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--to-hf", action="store_true", help="write a transformers T5ForConditionalGeneration dir")
    mode.add_argument("--from-hf", action="store_true", help="read a T5 v1.1 / mT5 HF dir")
    ap.add_argument("--model-config", type=Path, help="CPM-2 model config JSON (required with --to-hf)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    ap.add_argument("--iteration", default=None, help="input iteration (default: the tracker's)")
    ap.add_argument("--save-iteration", default="release", help="iteration tag written by --from-hf")
    roles = ap.add_argument_group("--to-hf special tokens (default: CPM-2 roles; pad 5, <s> 1, eos <s_1>)")
    roles.add_argument("--vocab-file", type=Path, help="CPM-2 vocab.txt: look <pad>, <s>, <s_1> up by string")
    roles.add_argument("--num-sentinels", type=int, default=None,
                       help="sentinels at the end of the vocab (default 190 for 26240, 185 for 51968)")
    roles.add_argument("--pad-token-id", type=int, default=None)
    roles.add_argument("--eos-token-id", type=int, default=None)
    roles.add_argument("--decoder-start-token-id", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.target_mp is not None and args.target_mp < 1:
        print(f"error: --target-mp must be >= 1, got {args.target_mp}", file=sys.stderr)
        return 2
    if args.to_hf and (args.model_config is None or args.target_mp is not None):
        print("error: --to-hf needs --model-config JSON and takes no --target-mp", file=sys.stderr)
        return 2
    hf_only = [f"--{k.replace('_', '-')}" for k in ("model_config", "vocab_file", "num_sentinels", *TOKEN_ROLES)
               if getattr(args, k) is not None]
    if hf_only and not args.to_hf:
        print(f"error: {', '.join(hf_only)} only apply with --to-hf", file=sys.stderr)
        return 2
    try:
        if args.to_hf:
            written: Any = to_hf(args.load, args.save, args.model_config, args)
        elif args.from_hf:
            written = from_hf(args.load, args.save, args)
        else:
            written = reshard(args.load, args.save, args.target_mp, dtype=DTYPES.get(args.dtype),
                              iteration=args.iteration, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = peak_rss_bytes()
    files = written if isinstance(written, list) else [written]
    logger.info("wrote %d file(s) under %s; peak RSS %.1f MiB", len(files), args.save, peak / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
