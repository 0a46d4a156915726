"""Batch encoded examples into padded tensors (docs/design.md, ``data_utils.dataset.collate``).

Re-exported by ``data_utils.dataset``; kept apart so that the dataset module stays about reading and caching.

Target layout for every task (SPEC §6): decoder input ``[<s>, <s_0>] + answer_ids[:-1]``, labels
``[<s_0>] + answer_ids``, so ``labels[:, t]`` is what the decoder should predict after reading
``dec_input_ids[:, t]``. Padding is dynamic: each batch is padded to its own longest sequence.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

__all__ = ["collate", "make_collate", "make_prompt_mask_fn", "PromptMaskFn"]

# (enc_input_ids [B, Le] long, key padding [B, Le] float 1 = real) -> enc_attention_mask [B, 1, Le, Le] float
PromptMaskFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """[len(rows), longest] int64, right-padded with ``value`` (at least one column)."""
    width = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
    return out


def _padding_mask(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """[len(rows), width] float: 1 over each row's real tokens, 0 over padding."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return (torch.arange(width)[None, :] < lengths[:, None]).float()


def make_prompt_mask_fn(*, mask_prompt2token: bool, mask_token2prompt: bool) -> Optional[PromptMaskFn]:
    """The original's attention-mask ablations (``reference/original-toolkit.md`` §6) as a batched function.

    A position is a prompt position when its id is negative. With query i and key j:
    ``mask_prompt2token`` allows i->j iff (P(i) and P(j)) or not P(i)  (prompts see only prompts);
    ``mask_token2prompt`` allows i->j iff (P(i) and P(j)) or not P(j)  (text never sees prompts).
    Both flags apply both rules. Padding keys are always masked. Returns None when neither flag is set.
    """
    if not (mask_prompt2token or mask_token2prompt):
        return None

    def prompt_mask(enc_input_ids: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        is_prompt = enc_input_ids < 0  # [B, Le]
        query = is_prompt[:, :, None]  # [B, Le, 1]
        key = is_prompt[:, None, :]  # [B, 1, Le]
        allowed = torch.ones_like(query & key)  # [B, Le, Le]
        if mask_prompt2token:
            allowed = allowed & ((query & key) | ~query)
        if mask_token2prompt:
            allowed = allowed & ((query & key) | ~key)
        return (allowed.float() * key_padding[:, None, :])[:, None]  # [B, 1, Le, Le]

    return prompt_mask


def collate(examples: Sequence[Mapping[str, Any]], *, pad_id: int, decoder_start_id: int, s0_id: int,
            prompt_mask_fn: Optional[PromptMaskFn] = None) -> dict[str, Any]:
    """Pad a list of ``TaskDataset`` items into a batch.

    Returns (B examples; Le, Ld the batch's longest encoder / decoder length):
      * ``enc_input_ids [B, Le]`` long, padded with ``pad_id`` (negative ids are soft-prompt positions);
      * ``enc_attention_mask [B, Le]`` float, 1 = real token (key padding), or ``[B, 1, Le, Le]`` float from
        ``prompt_mask_fn(enc_input_ids, key_padding)`` for the prompt-mask ablations;
      * ``cross_attention_mask [B, Le]`` float: the encoder key padding;
      * ``dec_input_ids [B, Ld]`` long = ``[decoder_start, <s_0>] + answer_ids[:-1]``, padded with ``pad_id``;
      * ``labels [B, Ld]`` long = ``[<s_0>] + answer_ids``, padded with ``pad_id``;
      * ``loss_mask [B, Ld]`` float, 1 over each row's ``1 + len(answer_ids)`` real label positions;
      * classify tasks (items carry non-empty ``candidate_ids``): ``candidate_ids [B, C]`` long padded with -1 (C = most
        candidates in the batch) and ``label_index [B]`` long (-1 = unlabelled);
      * ``index [B]`` long: the item's row in the dataset (``item["index"]``, else its position in the batch).
    An item without answer ids (unlabelled) gets decoder input ``[<s>, <s_0>]`` and labels ``[<s_0>, pad]`` with
    loss_mask ``[1, 0]``: the classify read-out position exists and a stray loss stays finite.

    Rank tasks (items carry ``group_enc_ids``, G encoder inputs per example) are flattened group-major:
      * ``enc_input_ids``, ``enc_attention_mask``, ``cross_attention_mask`` ``[B*G, Le]``, row ``b*G + g`` being
        member g of example b; G = the largest group in the batch (``group_size``, a Python int);
      * a smaller group is filled with copies of its first member (real tokens, so no fully masked softmax row)
        and ``group_mask [B, G]`` float marks the real members (1) — mask the filled ones out of the loss/score;
      * ``dec_input_ids [B*G, 2]`` = ``[decoder_start, <s_0>]``: the score is read at the last decoder position;
      * ``label_index [B]`` (gold member, -1 unlabelled), ``index [B]``, and ``candidate_ids [B, C]`` (the score
        token(s), -1 padded) when the items carry them; no ``labels`` / ``loss_mask``.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    batch: dict[str, Any]
    if "group_enc_ids" in examples[0]:
        batch = _collate_rank(examples, pad_id=pad_id, decoder_start_id=decoder_start_id, s0_id=s0_id)
    else:
        batch = _collate_seq2seq(examples, pad_id=pad_id, decoder_start_id=decoder_start_id, s0_id=s0_id)
    enc_rows_ids = batch["enc_input_ids"]
    key_padding = batch["cross_attention_mask"]
    if prompt_mask_fn is not None:
        batch["enc_attention_mask"] = prompt_mask_fn(enc_rows_ids, key_padding)
    batch["index"] = torch.tensor([int(ex.get("index", i)) for i, ex in enumerate(examples)], dtype=torch.long)
    return batch


def _encoder_tensors(rows: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    enc = _pad(rows, pad_id)
    key_padding = _padding_mask(rows, enc.shape[1])
    return {"enc_input_ids": enc, "enc_attention_mask": key_padding, "cross_attention_mask": key_padding.clone()}


def _collate_seq2seq(examples, *, pad_id: int, decoder_start_id: int, s0_id: int) -> dict[str, Any]:
    batch = _encoder_tensors([ex["enc_ids"] for ex in examples], pad_id)
    dec_rows, label_rows, label_lengths = [], [], []
    for ex in examples:
        answer = list(ex.get("answer_ids") or [])
        if answer:
            dec_rows.append([decoder_start_id, s0_id] + answer[:-1])
            label_rows.append([s0_id] + answer)
        else:
            dec_rows.append([decoder_start_id, s0_id])
            label_rows.append([s0_id])
        label_lengths.append(len(label_rows[-1]))
    batch["dec_input_ids"] = _pad(dec_rows, pad_id)
    width = batch["dec_input_ids"].shape[1]
    labels = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels[:, : max(label_lengths)] = _pad(label_rows, pad_id)
    batch["labels"] = labels
    batch["loss_mask"] = _padding_mask(label_rows, width)

    # Task.encode gives every task a `candidate_ids` key (empty outside classification); only real candidates
    # make a classify batch.
    if any(ex.get("candidate_ids") for ex in examples):
        batch["candidate_ids"] = _pad([ex["candidate_ids"] for ex in examples], -1)
        batch["label_index"] = _label_index(examples)
    return batch


def _collate_rank(examples, *, pad_id: int, decoder_start_id: int, s0_id: int) -> dict[str, Any]:
    groups = [list(ex["group_enc_ids"]) for ex in examples]
    if any(len(g) == 0 for g in groups):
        raise ValueError("collate: a rank example has an empty group_enc_ids")
    group_size = max(len(g) for g in groups)
    rows = [g[k] if k < len(g) else g[0] for g in groups for k in range(group_size)]  # [B*G] group-major
    batch = _encoder_tensors(rows, pad_id)
    batch["group_size"] = group_size
    batch["group_mask"] = _padding_mask(groups, group_size)  # [B, G]
    batch["dec_input_ids"] = torch.tensor([[decoder_start_id, s0_id]] * len(rows), dtype=torch.long)
    batch["label_index"] = _label_index(examples)
    if any(ex.get("candidate_ids") for ex in examples):  # the score token(s), e.g. Sogou's 相关
        batch["candidate_ids"] = _pad([ex["candidate_ids"] for ex in examples], -1)
    return batch


def _label_index(examples) -> torch.Tensor:
    values = [ex.get("label_index") for ex in examples]
    return torch.tensor([-1 if v is None else int(v) for v in values], dtype=torch.long)


def _prompt_flag(prompt_config: Any, name: str) -> bool:
    if prompt_config is None:
        return False
    if isinstance(prompt_config, Mapping):
        return bool(prompt_config.get(name, False))
    return bool(getattr(prompt_config, name, False))


def make_collate(task: Any, tokenizer: Any, prompt_config: Any = None) -> Callable[[Sequence[Mapping]], dict]:
    """``collate`` bound to the tokenizer's roles and the prompt config's mask ablations (a dict of the prompt
    JSON or an object with ``mask_prompt2token`` / ``mask_token2prompt`` attributes), for a DataLoader.

    ``task`` is accepted for symmetry with the dataset (collate reads the batch layout from the items)."""
    del task  # the item keys (group_enc_ids, candidate_ids) select the layout
    mask_fn = make_prompt_mask_fn(mask_prompt2token=_prompt_flag(prompt_config, "mask_prompt2token"),
                                  mask_token2prompt=_prompt_flag(prompt_config, "mask_token2prompt"))
    return functools.partial(collate, pad_id=tokenizer.pad_id, decoder_start_id=tokenizer.decoder_start_id,
                             s0_id=tokenizer.get_sentinel_id(0), prompt_mask_fn=mask_fn)
