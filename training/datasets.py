"""Build the tokenised dataset of one split and the batch collate from the CLI settings."""
from __future__ import annotations

import logging

from data_utils.collate import make_collate
from data_utils.dataset import TaskDataset

logger = logging.getLogger("cpm2")


def build_dataset(args, task, tokenizer, split: str, prompt_cfg):
    ratio = getattr(args, f"{split}_ratio", None)
    num = getattr(args, f"{split}_num", None)
    ds = TaskDataset(task, tokenizer, args.data_path, split, args.data_ext or task.default_ext,
                     prompt=prompt_cfg, max_enc_len=args.enc_seq_length, max_dec_len=args.dec_seq_length,
                     cache_dir=args.cache_dir, skip_bad_lines=args.skip_bad_lines, ratio=ratio, num=num)
    logger.info("%s: %d examples from %s", split, len(ds), args.data_path)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {args.data_path} holds no examples")
    return ds


def make_batch_collate(task, tokenizer, prompt_cfg):
    return make_collate(task, tokenizer, prompt_config=prompt_cfg)
