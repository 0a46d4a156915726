"""Parameter names, model-parallel split rules and the Hugging Face T5 name mapping, in one table.

Every CPM-2 parameter is either replicated on all model-parallel (MP) ranks or split along one dim into
equal contiguous parts. Fused weights are split with a *stride*: `project` is [Q; K; V] stacked on dim 0
and rank r of p holds [Q_r; K_r; V_r] (stride 3), `project_kv` holds [K_r; V_r] (stride 2), so that every
rank owns whole heads for Q, K and V alike (SPEC §2, reference/original-toolkit.md §3.2). The original
re-sharding script ignored the stride and split `lm_head`/`project*`/`wi_*` on the wrong axis (issues
#16, #24, #49 of CPM-2-Finetune); everything here goes through `copy_overlap`, one piece of index
arithmetic used for merging, splitting and re-sharding alike.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

__all__ = [
    "ParamSpec", "SplitRule", "PARAM_TABLE", "WORD_EMBED_ALIASES", "spec_for", "split_rule_for",
    "full_shape", "shard_shape", "copy_overlap", "merge_shards", "split_full", "drop_aliases",
    "expected_names", "hf_names_for", "overlapping_ranks",
]


@dataclass(frozen=True)
class SplitRule:
    """How one parameter is cut across MP ranks: `dim` None means replicated."""

    dim: int | None
    stride: int = 1  # number of fused sub-matrices stacked along `dim` (3 for Q/K/V, 2 for K/V)


REPLICATED = SplitRule(None)
ROWS = SplitRule(0)  # ColumnParallelLinear / VocabParallelEmbedding: output rows split
COLS = SplitRule(1)  # RowParallelLinear: input columns split; relative bias [buckets, heads]: heads split


@dataclass(frozen=True)
class ParamSpec:
    """One row of the table. `name` may hold `{stack}` (encoder|decoder) and `{i}` (block index).

    `hf` lists the Hugging Face `T5ForConditionalGeneration` names whose dim-0 concatenation is this
    parameter (three for the fused QKV, two for the fused cross K/V); `{ff}` is the HF sub-layer index of
    the feed-forward (1 in encoder blocks, 2 in decoder blocks, after the cross-attention).
    """

    name: str
    split: SplitRule
    hf: tuple[str, ...]
    first_block_only: bool = False  # the relative bias table lives in block 0 and is shared by all blocks
    optional: bool = False  # present only in prompt-tuned checkpoints

    @property
    def pattern(self) -> re.Pattern:
        return _compile(self.name)


_SA = "{stack}.block.{i}.layer.0.SelfAttention"
_CA = "decoder.block.{i}.layer.1.EncDecAttention"
_FF = "{stack}.block.{i}.layer.{ff}"

# THE table. Names are the original toolkit's (hence the odd `self_attn.self_attn` and `dense_relu_dense`).
PARAM_TABLE: tuple[ParamSpec, ...] = (
    ParamSpec("word_embeds.weight", ROWS, ("shared.weight",)),
    ParamSpec("lm_head.weight", ROWS, ("lm_head.weight",)),
    ParamSpec("{stack}.blocks.{i}.self_attn.self_attn.project.weight", SplitRule(0, stride=3),
              (f"{_SA}.q.weight", f"{_SA}.k.weight", f"{_SA}.v.weight")),
    ParamSpec("{stack}.blocks.{i}.self_attn.self_attn.relative_attention_bias.weight", COLS,
              (f"{_SA}.relative_attention_bias.weight",), first_block_only=True),
    ParamSpec("{stack}.blocks.{i}.self_attn.self_attn.dense.weight", COLS, (f"{_SA}.o.weight",)),
    ParamSpec("{stack}.blocks.{i}.self_attn.layer_norm.weight", REPLICATED,
              ("{stack}.block.{i}.layer.0.layer_norm.weight",)),
    ParamSpec("decoder.blocks.{i}.cross_attn.cross_attn.project_q.weight", ROWS, (f"{_CA}.q.weight",)),
    ParamSpec("decoder.blocks.{i}.cross_attn.cross_attn.project_kv.weight", SplitRule(0, stride=2),
              (f"{_CA}.k.weight", f"{_CA}.v.weight")),
    ParamSpec("decoder.blocks.{i}.cross_attn.cross_attn.dense.weight", COLS, (f"{_CA}.o.weight",)),
    ParamSpec("decoder.blocks.{i}.cross_attn.layer_norm.weight", REPLICATED,
              ("decoder.block.{i}.layer.1.layer_norm.weight",)),
    ParamSpec("{stack}.blocks.{i}.ff.dense_relu_dense.wi_0.weight", ROWS, (f"{_FF}.DenseReluDense.wi_0.weight",)),
    ParamSpec("{stack}.blocks.{i}.ff.dense_relu_dense.wi_1.weight", ROWS, (f"{_FF}.DenseReluDense.wi_1.weight",)),
    ParamSpec("{stack}.blocks.{i}.ff.dense_relu_dense.wo.weight", COLS, (f"{_FF}.DenseReluDense.wo.weight",)),
    ParamSpec("{stack}.blocks.{i}.ff.layer_norm.weight", REPLICATED, (f"{_FF}.layer_norm.weight",)),
    ParamSpec("{stack}.final_layernorm.weight", REPLICATED, ("{stack}.final_layer_norm.weight",)),
    # Soft prompt (SPEC §7): replicated on every rank, no Hugging Face counterpart.
    ParamSpec("encoder.prompt_embeds.weight", REPLICATED, (), optional=True),
)

# The original model kept a reference to the shared embedding in each stack, so its state_dict (and the
# released files) may also carry these two names for the same tensor (reference/original-toolkit.md §3.2).
WORD_EMBED_ALIASES: tuple[str, ...] = ("encoder.word_embeds.weight", "decoder.word_embeds.weight")

_FF_LAYER = {"encoder": 1, "decoder": 2}  # HF T5: decoder blocks have the cross-attention as layer 1


def _compile(template: str) -> re.Pattern:
    rx = re.escape(template).replace(r"\{stack\}", "(?P<stack>encoder|decoder)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(rx)


_COMPILED = tuple((spec.pattern, spec) for spec in PARAM_TABLE)


def spec_for(name: str) -> tuple[ParamSpec, dict[str, str]] | None:
    """The table row matching a parameter name and the captured fields (`stack`, `i`), or None if unknown."""
    for pattern, spec in _COMPILED:
        m = pattern.fullmatch(name)
        if m:
            return spec, m.groupdict()
    return None


def split_rule_for(name: str, *, source: str = "state dict") -> SplitRule:
    found = spec_for(name)
    if found is None:
        raise ValueError(f"{source}: unknown parameter {name!r}: it is not a CPM-2 parameter name "
                         f"(see the table in model/sharding.py)")
    return found[0].split


def hf_names_for(name: str) -> tuple[str, ...]:
    """The Hugging Face T5 names whose dim-0 concatenation is parameter `name` (empty: no counterpart)."""
    found = spec_for(name)
    if found is None:
        raise ValueError(f"unknown parameter {name!r}")
    spec, fields = found
    fields = dict(fields)
    if "stack" in fields:
        fields["ff"] = str(_FF_LAYER[fields["stack"]])
    return tuple(t.format(**fields) for t in spec.hf)


def expected_names(num_layers: int, num_decoder_layers: int | None = None, *, prompt: bool = False) -> list[str]:
    """All parameter names of a model with this many encoder / decoder blocks, in table order."""
    layers = {"encoder": num_layers, "decoder": num_layers if num_decoder_layers is None else num_decoder_layers}
    names: list[str] = []
    for spec in PARAM_TABLE:
        if spec.optional and not prompt:
            continue
        stacks = ("encoder", "decoder") if "{stack}" in spec.name else (spec.name.split(".")[0],)
        for stack in stacks:
            if "{i}" not in spec.name:
                names.append(spec.name.format(stack=stack))
                if "{stack}" not in spec.name:
                    break
                continue
            blocks = range(1) if spec.first_block_only else range(layers[stack])
            names.extend(spec.name.format(stack=stack, i=i) for i in blocks)
    return names


def _check_divides(name: str, size: int, parts: int, rule: SplitRule, what: str) -> None:
    if size % (rule.stride * parts) != 0:
        unit = f"{rule.stride} x {parts}" if rule.stride > 1 else f"{parts}"
        raise ValueError(f"{what}: MP size {parts} does not divide {name} (size {size} along dim {rule.dim} "
                         f"must be a multiple of {unit}); choose an MP size that divides num_heads, d_ff and "
                         f"vocab_size")


def full_shape(name: str, local_shape: Iterable[int], mp_size: int) -> tuple[int, ...]:
    """Full shape of `name` given the shape of one of its `mp_size` shards."""
    shape = list(local_shape)
    rule = split_rule_for(name)
    if rule.dim is not None:
        shape[rule.dim] *= mp_size
    return tuple(shape)


def shard_shape(name: str, shape: Iterable[int], mp_size: int, *, what: str = "split") -> tuple[int, ...]:
    """Shape of one of `mp_size` shards of the full tensor `name`; raises if `mp_size` does not divide it."""
    shape = list(shape)
    rule = split_rule_for(name)
    if rule.dim is not None:
        _check_divides(name, shape[rule.dim], mp_size, rule, what)
        shape[rule.dim] //= mp_size
    return tuple(shape)


def copy_overlap(name: str, src: torch.Tensor, src_rank: int, src_size: int,
                 dst: torch.Tensor, dst_rank: int, dst_size: int) -> int:
    """Copy the part of shard `src_rank`/`src_size` that shard `dst_rank`/`dst_size` also holds into `dst`.

    Shards of one parameter at two MP sizes; size 1 is the full tensor, so this merges (dst_size 1), splits
    (src_size 1) and re-shards (any sizes) with one rule. With stride s the split dim is s blocks of size
    B; each block is cut into `size` equal parts and rank r keeps part r of every block, in block order.
    Casts to `dst.dtype`. Returns the number of elements copied (0 when the shards do not overlap).
    """
    rule = split_rule_for(name)
    if rule.dim is None:
        dst.copy_(src)
        return dst.numel()
    d, s = rule.dim, rule.stride
    block = src.shape[d] * src_size // s  # full length of one fused block (e.g. all Q rows)
    src_part, dst_part = block // src_size, block // dst_size
    lo = max(src_rank * src_part, dst_rank * dst_part)  # overlap of the two shards within one block
    hi = min((src_rank + 1) * src_part, (dst_rank + 1) * dst_part)
    if hi <= lo:
        return 0
    copied = 0
    for j in range(s):
        piece = src.narrow(d, j * src_part + lo - src_rank * src_part, hi - lo)
        dst.narrow(d, j * dst_part + lo - dst_rank * dst_part, hi - lo).copy_(piece)
        copied += piece.numel()
    return copied


def overlapping_ranks(rank: int, size: int, other_size: int) -> list[int]:
    """Ranks of an `other_size`-way split whose parts overlap part `rank` of a `size`-way split."""
    # Parts are proportional for every parameter (fused blocks too), so the overlap is the same for all.
    return [o for o in range(other_size) if o * size < (rank + 1) * other_size and (o + 1) * size > rank * other_size]


def drop_aliases(module: Mapping[str, torch.Tensor], *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Remove the `{encoder,decoder}.word_embeds.weight` aliases after checking they equal `word_embeds`."""
    out = dict(module)
    for alias in WORD_EMBED_ALIASES:
        if alias not in out:
            continue
        value = out.pop(alias)
        main = out.get("word_embeds.weight")
        if main is None:
            raise ValueError(f"{source}: has {alias!r} but no 'word_embeds.weight'")
        if value.shape != main.shape or not torch.equal(value, main):
            raise ValueError(f"{source}: {alias!r} differs from 'word_embeds.weight'; it must be an alias of it")
    return out


def merge_shards(shards: list[Mapping[str, torch.Tensor]], *, source: str = "shards") -> dict[str, torch.Tensor]:
    """Merge the `module` dicts of all MP ranks (in rank order) into one full state dict (aliases dropped)."""
    if not shards:
        raise ValueError(f"{source}: no shards to merge")
    q = len(shards)
    shards = [drop_aliases(s, source=f"{source}[rank {r}]") for r, s in enumerate(shards)]
    names = list(shards[0])
    full: dict[str, torch.Tensor] = {}
    for r, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            diff = sorted(set(shard) ^ set(names))
            raise ValueError(f"{source}: rank {r} and rank 0 hold different keys: {diff[:5]}")
    for name in names:
        first = shards[0][name]
        out = first.new_empty(full_shape(name, first.shape, q))
        for r, shard in enumerate(shards):
            if shard[name].shape != first.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(shard[name].shape)} at rank {r} but "
                                 f"{tuple(first.shape)} at rank 0")
            copy_overlap(name, shard[name], r, q, out, 0, 1)
            if split_rule_for(name).dim is None:
                break  # replicated: every rank holds the same tensor
        full[name] = out
    return full


def split_full(full: Mapping[str, torch.Tensor], mp_size: int, rank: int, *,
               source: str = "state dict") -> dict[str, torch.Tensor]:
    """Shard `rank` of `mp_size` of a full state dict (aliases dropped; new contiguous tensors)."""
    if not 0 <= rank < mp_size:
        raise ValueError(f"rank {rank} is out of range for MP size {mp_size}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in drop_aliases(full, source=source).items():
        split_rule_for(name, source=source)
        shard = tensor.new_empty(shard_shape(name, tensor.shape, mp_size, what=source))
        copy_overlap(name, tensor, 0, 1, shard, rank, mp_size)
        out[name] = shard
    return out
