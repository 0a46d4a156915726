"""EncDecModel: CPM-2 / T5 v1.1 encoder-decoder with tensor parallelism, soft prompts and an incremental cache.

Public contract: SPEC §2 and docs/design.md "model". See docs/model.md for the numerics choices.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import mpu
from mpu.fast_linear import linear

from .configuration_enc_dec import EncDecConfig
from .transformer import LayerCache, Stack

# Released shards may carry these aliases of `word_embeds.weight` (original-toolkit.md §3.2): the original stacks
# held a reference to the shared embedding. Our stacks get it at forward time instead, so they are never emitted.
ALIAS_KEYS = ("encoder.word_embeds.weight", "decoder.word_embeds.weight")


def drop_alias_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without the two ``{encoder,decoder}.word_embeds.weight`` alias keys."""
    return {k: v for k, v in state_dict.items() if k not in ALIAS_KEYS}


def additive_mask(mask: Optional[torch.Tensor], *, q_len: int, k_len: int, dtype: torch.dtype,
                  device: torch.device, causal_offset: Optional[int] = None, name: str = "mask",
                  ) -> Optional[torch.Tensor]:
    """Turn a "1 = may attend" mask into an additive float mask ``[B or 1, 1, Lq, Lk]`` (0 or a large negative).

    ``mask``: None, 2-D key padding ``[B, Lk]``, 3-D ``[B, Lq, Lk]`` or 4-D ``[B, 1, Lq, Lk]`` (float, int or bool;
    nonzero = attend). A 3-/4-D mask with more than ``Lq`` query rows (the full-length mask during incremental
    decoding) keeps its last ``Lq`` rows. With ``causal_offset`` (decoder self-attention; queries at absolute
    positions ``offset..offset+Lq-1``) a missing mask or one with a single query row (key padding) is combined with
    the causal mask; a 3-/4-D mask with query rows is taken as given (the original passed causal 4-D masks). The negative value is half the dtype's minimum: finite,
    so a fully masked (padding) query row gives a uniform softmax instead of NaN, with room for the position bias.
    """
    allowed = None
    if mask is not None:
        if mask.dim() == 2:
            mask = mask[:, None, None, :]  # [B, 1, 1, Lk]
        elif mask.dim() == 3:
            mask = mask[:, None]  # [B, 1, Lq, Lk]
        elif mask.dim() != 4:
            raise ValueError(f"{name} must be [B, Lk], [B, Lq, Lk] or [B, 1, Lq, Lk], got {tuple(mask.shape)}")
        rows_fit = mask.size(-2) == 1 or mask.size(-2) >= q_len
        if mask.size(-1) != k_len or not rows_fit:
            raise ValueError(f"{name} of shape {tuple(mask.shape)} does not fit {q_len} queries and {k_len} keys")
        if mask.size(-2) > q_len:
            mask = mask[..., -q_len:, :]
        allowed = mask.to(device) != 0
        causal_offset = causal_offset if mask.size(-2) == 1 else None  # full masks already say what is visible
    if causal_offset is not None and k_len <= causal_offset + 1:
        causal_offset = None  # no key lies after the first query (a decode step): the causal mask hides nothing
    if causal_offset is not None:
        query = torch.arange(causal_offset, causal_offset + q_len, device=device)[:, None]  # [Lq, 1]
        causal = torch.arange(k_len, device=device)[None, :] <= query  # [Lq, Lk]
        allowed = causal[None, None] if allowed is None else allowed & causal
    if allowed is None:
        return None
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min / 2)


def _check_ids(ids: torch.Tensor, low: int, high: int, name: str) -> None:
    """Raise ValueError when an id is outside ``[low, high)`` (one host sync; cheap next to the model)."""
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < low or hi >= high:
        raise ValueError(f"{name} holds ids in [{lo}, {hi}], outside the allowed [{low}, {high - 1}] "
                         "(negative ids are soft-prompt positions and need a prompt_config with enc.prompt_len)")


class EncDecModel(nn.Module):
    """CPM-2 encoder-decoder. Parameter names are the released checkpoint's (SPEC §2 table).

    Args:
        config: sizes; ``config.vocab_size`` must be set.
        parallel_output: keep logits vocab-parallel ``[B, Ld, V/mp]``; False gathers them to ``[B, Ld, V]``.
        checkpoint_activations: recompute each block in backward (``mpu.checkpoint``); no cache is returned then.
        prompt_config: the prompt-tuning dict; ``prompt_config["enc"]["prompt_len"] > 0`` creates
            ``encoder.prompt_embeds`` (replicated on every MP rank).
    """

    def __init__(self, config: EncDecConfig, parallel_output: bool = True, checkpoint_activations: bool = False,
                 prompt_config: Optional[dict] = None) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size is not set; set it from the tokenizer (config.vocab_size = V)")
        mpu.check_model_parallel_size(mpu.get_model_parallel_world_size(), {
            "num_heads": config.num_heads, "d_ff": config.d_ff, "vocab_size": config.vocab_size})
        self.config, self.parallel_output = config, parallel_output
        init = mpu.init_method_normal(config.init_method_std)
        # Scaled init of the residual-branch outputs (GPT-2 / Megatron); the original uses num_layers for both stacks.
        output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
        output_init = mpu.init_method_normal(output_std) if config.use_scaled_init_for_output_weights else init
        stack = dict(init_method=init, output_init_method=output_init, checkpoint_activations=checkpoint_activations)

        self.word_embeds = mpu.VocabParallelEmbedding(config.vocab_size, config.d_model, init_method=init)
        self.encoder = Stack(config, is_decoder=False, num_layers=config.num_layers, **stack)
        self.decoder = Stack(config, is_decoder=True, num_layers=config.num_decoder_layers, **stack)
        # Untied output head with the embedding's shape and split (vocab rows); logits are not scaled.
        self.lm_head = mpu.VocabParallelEmbedding(config.vocab_size, config.d_model, init_method=init)

        self._compiled_forward = None  # see compile_training_forward
        self.prompt_len = int(((prompt_config or {}).get("enc") or {}).get("prompt_len", 0) or 0)
        if self.prompt_len > 0:
            weight = torch.empty(self.prompt_len, config.d_model)
            init(weight)  # full and replicated: the same draw on every rank and MP size
            self.encoder.prompt_embeds = nn.Embedding(self.prompt_len, config.d_model, _weight=weight)

    # -- embeddings ------------------------------------------------------------------------------------------------

    def embed_encoder_input(self, ids: torch.Tensor, words: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, Le]`` ids (``-1..-P`` = prompt rows ``0..P-1``) -> ``[B, Le, d]``. ``words``: the word embeddings
        of ``ids.clamp(min=0)``, already looked up (and the ids checked) by the caller."""
        if words is None:
            _check_ids(ids, -self.prompt_len, self.config.vocab_size, "enc_input_ids")
        embeds = self.word_embeds(ids.clamp(min=0)) if words is None else words  # [B, Le, d]
        if self.prompt_len == 0:
            return embeds
        is_prompt = ids < 0
        prompt = self.encoder.prompt_embeds((-ids - 1).clamp(min=0)).to(embeds.dtype)  # [B, Le, d]
        return torch.where(is_prompt.unsqueeze(-1), prompt, embeds)

    def _embed_both(self, enc_input_ids: torch.Tensor, dec_input_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder and decoder word embeddings from one lookup (training): the shared table then gets one dense
        gradient instead of two that are zero-filled and summed (a [V, d] buffer each, every step)."""
        _check_ids(enc_input_ids, -self.prompt_len, self.config.vocab_size, "enc_input_ids")
        _check_ids(dec_input_ids, 0, self.config.vocab_size, "dec_input_ids")
        n_enc = enc_input_ids.numel()
        both = self.word_embeds(torch.cat([enc_input_ids.clamp(min=0).reshape(-1), dec_input_ids.reshape(-1)]))
        return (both[:n_enc].view(*enc_input_ids.shape, -1), both[n_enc:].view(*dec_input_ids.shape, -1))

    # -- forward ---------------------------------------------------------------------------------------------------

    def encode(self, enc_input_ids: torch.Tensor, enc_attention_mask: Optional[torch.Tensor] = None, *,
               words: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, Le]`` ids -> encoder output ``[B, Le, d]`` (``words``: see :meth:`embed_encoder_input`)."""
        h = self.embed_encoder_input(enc_input_ids, words)
        length = enc_input_ids.size(1)
        mask = additive_mask(enc_attention_mask, q_len=length, k_len=length, dtype=h.dtype, device=h.device,
                             name="enc_attention_mask")
        return self.encoder(h, mask)[0]

    def decode(self, dec_input_ids: torch.Tensor, *, enc_hidden_states: Optional[torch.Tensor] = None,
               dec_attention_mask: Optional[torch.Tensor] = None, cross_attention_mask: Optional[torch.Tensor] = None,
               past_key_values: Optional[list[LayerCache]] = None, words: Optional[torch.Tensor] = None,
               ) -> tuple[torch.Tensor, Optional[list[LayerCache]]]:
        """Decoder stack: ``[B, Ld]`` ids -> (hidden ``[B, Ld, d]``, caches). ``words``: the ids' embeddings,
        already looked up (and the ids checked) by the caller."""
        if enc_hidden_states is None and past_key_values is None:
            raise ValueError("the decoder needs enc_hidden_states (or enc_input_ids) or past_key_values")
        if past_key_values is not None and len(past_key_values) != len(self.decoder.blocks):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the decoder has "
                             f"{len(self.decoder.blocks)}")
        if words is None:
            _check_ids(dec_input_ids, 0, self.config.vocab_size, "dec_input_ids")
        h = self.word_embeds(dec_input_ids) if words is None else words  # [B, Ld, d]
        q_len = dec_input_ids.size(1)
        offset = 0 if past_key_values is None else past_key_values[0]["self_k"].size(2)
        enc_len = past_key_values[0]["cross_k"].size(2) if past_key_values is not None else enc_hidden_states.size(1)
        self_mask = additive_mask(dec_attention_mask, q_len=q_len, k_len=offset + q_len, dtype=h.dtype,
                                  device=h.device, causal_offset=offset, name="dec_attention_mask")
        cross_mask = additive_mask(cross_attention_mask, q_len=q_len, k_len=enc_len, dtype=h.dtype, device=h.device,
                                   name="cross_attention_mask")
        return self.decoder(h, self_mask, enc_hidden=enc_hidden_states, cross_mask=cross_mask,
                            past=past_key_values, offset=offset)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, L, d]`` -> ``[B, L, V/mp]`` (``[B, L, V]`` when ``parallel_output`` is False)."""
        hidden = mpu.copy_to_model_parallel_region(hidden)
        logits = linear(hidden, self.lm_head.weight.to(hidden.dtype))  # [B, L, V/mp]
        return logits if self.parallel_output else mpu.gather_from_model_parallel_region(logits)

    def forward(self, enc_input_ids: Optional[torch.Tensor] = None,
                enc_attention_mask: Optional[torch.Tensor] = None,
                dec_input_ids: Optional[torch.Tensor] = None,
                dec_attention_mask: Optional[torch.Tensor] = None,
                cross_attention_mask: Optional[torch.Tensor] = None,
                past_key_values: Optional[list[LayerCache]] = None,
                enc_hidden_states: Optional[torch.Tensor] = None,
                only_encoder: bool = False) -> dict[str, Any]:
        """
        Args (B batch, Le/Ld encoder/decoder lengths; masks: 1 = may attend, see :func:`additive_mask`):
            enc_input_ids: ``[B, Le]`` long; negative ids are soft-prompt positions. Not needed when
                ``enc_hidden_states`` or ``past_key_values`` is given (the encoder is not run then).
            enc_attention_mask: ``[B, Le]`` or ``[B, 1, Le, Le]``; None = all visible.
            dec_input_ids: ``[B, Ld]`` long; with ``past_key_values`` only the new tokens.
            dec_attention_mask: ``[B, L_past + Ld]`` key padding (combined with causal) or ``[B, 1, Ld, L_past + Ld]``;
                None = causal.
            cross_attention_mask: ``[B, Le]`` or ``[B, 1, Ld, Le]``; None = all visible.
            past_key_values: per decoder layer ``{"self_k", "self_v": [B, Hp, L_past, dk], "cross_k", "cross_v":
                [B, Hp, Le, dk]}`` from the previous call.
            enc_hidden_states: ``[B, Le, d]`` from an ``only_encoder=True`` call.
            only_encoder: run the encoder only.
        Returns:
            dict with ``lm_logits`` ``[B, Ld, V/mp]`` (``V`` when ``parallel_output=False``; None with
            ``only_encoder``), ``encoder_last_hidden_state`` ``[B, Le, d]`` (None when only a cache was given) and
            ``past_key_values`` (the cache including this call's tokens; None for ``only_encoder`` and under
            activation checkpointing in training).
        """
        if self._compiled_forward is not None and self.training and not torch.compiler.is_compiling():
            return self._compiled_forward(enc_input_ids, enc_attention_mask, dec_input_ids, dec_attention_mask,
                                          cross_attention_mask, past_key_values, enc_hidden_states, only_encoder)
        enc_words = dec_words = None
        if enc_hidden_states is None and past_key_values is None and enc_input_ids is not None \
                and dec_input_ids is not None and not only_encoder and torch.is_grad_enabled() \
                and self.word_embeds.weight.requires_grad:
            enc_words, dec_words = self._embed_both(enc_input_ids, dec_input_ids)
        if enc_hidden_states is None and past_key_values is None:
            if enc_input_ids is None:
                raise ValueError("pass enc_input_ids, enc_hidden_states or past_key_values")
            enc_hidden_states = self.encode(enc_input_ids, enc_attention_mask, words=enc_words)
        if only_encoder:
            return {"lm_logits": None, "encoder_last_hidden_state": enc_hidden_states, "past_key_values": None}
        if dec_input_ids is None:
            raise ValueError("dec_input_ids is required unless only_encoder=True")
        hidden, caches = self.decode(dec_input_ids, enc_hidden_states=enc_hidden_states,
                                     dec_attention_mask=dec_attention_mask,
                                     cross_attention_mask=cross_attention_mask, past_key_values=past_key_values,
                                     words=dec_words)
        return {"lm_logits": self.logits(hidden), "encoder_last_hidden_state": enc_hidden_states,
                "past_key_values": caches}

    # -- utilities -------------------------------------------------------------------------------------------------

    def compile_training_forward(self, **compile_kwargs) -> None:
        """``--compile``: run the forward through ``torch.compile`` in training mode only.

        Evaluation and generation keep the eager path: their shapes change per batch and per decode step (each a
        recompile), and generation's decode steps do not use ``forward`` at all (model/decode_step.py). Parameter
        names, and so checkpoints, are unchanged (the module itself is not wrapped). On CPU the linear layers stay
        in oneDNN inside the compiled graph (``mpu.fast_linear.onednn_linear``); the first steps pay the compile
        (~30 s for the 65M benchmark model on 2 cores).
        """
        self._compiled_forward = torch.compile(self.forward, **compile_kwargs)

    @staticmethod
    def reorder_cache(past_key_values: list[LayerCache], beam_idx: torch.Tensor) -> list[LayerCache]:
        """Select batch rows ``beam_idx`` ``[B']`` of every cached tensor (beam search): ``[B, ...] -> [B', ...]``."""
        return [{name: t.index_select(0, beam_idx.to(t.device)) for name, t in layer.items()}
                for layer in past_key_values]

    def param_groups(self, weight_decay: float, prompt_only: bool = False) -> list[dict[str, Any]]:
        """Optimizer param groups: norm weights and relative biases get no weight decay.

        ``prompt_only=True`` returns just ``[{"params": [encoder.prompt_embeds.weight], "weight_decay": wd}]``.
        Parameters with ``requires_grad=False`` are left out; empty groups are dropped.
        """
        if prompt_only:
            if self.prompt_len == 0:
                raise ValueError("prompt_only=True but the model has no soft prompt "
                                 "(build it with prompt_config={'enc': {'prompt_len': P}})")
            return [{"params": [self.encoder.prompt_embeds.weight], "weight_decay": weight_decay}]
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            plain = name.endswith("layer_norm.weight") or name.endswith("layernorm.weight") \
                or "relative_attention_bias" in name
            (no_decay if plain else decay).append(param)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` after dropping the ``{encoder,decoder}.word_embeds.weight`` aliases that
        released shards may carry (they are the same tensor as ``word_embeds.weight``)."""
        return super().load_state_dict(drop_alias_keys(state_dict), strict=strict, assign=assign)
