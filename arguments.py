"""Command-line flags of `finetune_cpm2.py`.

Every flag of the original CPM-2-Finetune `arguments.py` is accepted with its original spelling, so the
original scripts keep working. Flags that no longer do anything are listed in `COMPAT_ONLY_FLAGS` with the
reason, and a warning names them when set. Combinations are checked once here, before any work starts; every
error says what to do instead.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Sequence

logger = logging.getLogger(__name__)

# flag -> why it no longer does anything. Users of the original scripts pass these; we accept them and say so.
COMPAT_ONLY_FLAGS: dict[str, str] = {
    "cpu_optimizer": "the optimizer is always a client AdamW driven by DeepSpeed",
    "cpu_torch_adam": "the optimizer is always torch.optim.AdamW",
    "fp32_embedding": "mixed precision is handled by DeepSpeed (--fp16/--bf16)",
    "fp32_layernorm": "RMSNorm always computes in fp32",
    "fp32_tokentypes": "CPM-2 has no token types",
    "fp32_allreduce": "DeepSpeed chooses the all-reduce dtype",
    "eval_iters": "every dev/test example is always evaluated (the original ignored it too)",
    "data_prefix": "unused in the original",
    "seq_length": "use --enc-seq-length / --dec-seq-length",
    "num_checkpoints": "activation checkpointing wraps every block (--checkpoint-activations)",
    "deepspeed_activation_checkpointing": "--checkpoint-activations uses our RNG-restoring checkpoint",
    "checkpoint_num_layers": "activation checkpointing wraps every block",
    "finetune": "--load never restores pre-training optimizer or RNG state",
    "no_load_rng": "--load never restores RNG state; --resume always does",
    "no_load_optim": "--load reads weights only; optimizer state comes back only with --resume",
    "load_optimizer_states": "--load reads weights only; optimizer state comes back only with --resume",
    "load_lr_scheduler_states": "--load reads weights only; scheduler state comes back only with --resume",
    "resume_dataloader": "--resume always restores the data position",
    "no_save_optim": "checkpoints always hold the optimizer state so that --resume is exact",
    "no_save_rng": "checkpoints always hold the RNG states so that --resume is exact",
    "distributed_backend": "the backend follows the device: NCCL on GPU, gloo on CPU",
    "deepscale": "alias of --deepspeed",
}


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-config", type=str, default=None, help="model config JSON (configs/model/*.json)")
    g.add_argument("--model-parallel-size", type=int, default=1, help="tensor model-parallel size (divides heads, d_ff, vocab)")
    g.add_argument("--cpu-optimizer", action="store_true", help="compatibility only")
    g.add_argument("--cpu_torch_adam", action="store_true", help="compatibility only")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the training forward (evaluation and generation stay eager); ~5%% faster "
                        "steps on CPU after a compile of ~30 s")


def _add_precision(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--fp16", action="store_true", help="fp16 with DeepSpeed dynamic loss scaling (GPU only)")
    g.add_argument("--bf16", action="store_true", help="bf16 training (GPU; slow on most CPUs)")
    for name in ("embedding", "layernorm", "tokentypes", "allreduce"):
        g.add_argument(f"--fp32-{name}", action="store_true", help="compatibility only")
    g.add_argument("--hysteresis", type=int, default=None, help="fp16 loss-scale hysteresis (overrides the DS JSON)")
    g.add_argument("--loss-scale", type=float, default=None, help="static fp16 loss scale; 0 = dynamic (overrides the DS JSON)")
    g.add_argument("--loss-scale-window", type=int, default=None, help="fp16 dynamic loss-scale window (overrides the DS JSON)")
    g.add_argument("--min-scale", type=float, default=None, help="fp16 minimum loss scale (overrides the DS JSON)")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--prompt-tune", action="store_true", help="train soft prompts (needs --prompt-config)")
    g.add_argument("--prompt-config", type=str, default=None, help="prompt config JSON (configs/prompt/<task>/*.json)")
    g.add_argument("--load-prompt", type=str, default=None, help="prompt-only checkpoint dir to load on top of --load")
    g.add_argument("--do-train", action="store_true")
    g.add_argument("--do-valid", action="store_true", help="evaluate on dev during training")
    g.add_argument("--do-eval", action="store_true", help="evaluate on test (with the best weights after training)")
    g.add_argument("--do-infer", action="store_true", help="predict on the infer split (unlabelled), write predictions")
    for split in ("train", "dev", "test"):
        g.add_argument(f"--{split}-ratio", type=float, default=None, help=f"use the first fraction of {split}")
        g.add_argument(f"--{split}-num", type=int, default=None, help=f"use the first N examples of {split}")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=4, help="micro-batch size per data-parallel rank")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--train-iters", type=int, default=-1, help="optimizer steps; -1 derives it from --epochs")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--max-save", type=int, default=-1, help="keep the best k checkpoints by the task metric; -1 keeps 1")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --save")
    g.add_argument("--random-init", action="store_true", help="train from random weights (the only way without --load)")
    g.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead of failing")
    g.add_argument("--max-nonfinite-steps", type=int, default=100,
                   help="stop after this many consecutive non-finite losses (fp16); bf16/fp32 stop at the first")
    g.add_argument("--checkpoint-activations", action="store_true")
    g.add_argument("--checkpoint-num-layers", type=int, default=1, help="compatibility only")
    g.add_argument("--num-checkpoints", type=int, default=24, help="compatibility only")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true", help="compatibility only")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", type=str, default="linear",
                   choices=["constant", "linear", "cosine", "exponential", "noam"])
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--warmup", type=float, default=0.01, help="warm-up as a fraction of the training steps")
    g.add_argument("--save", type=str, default=None, help="output dir: checkpoints, logs, predictions")
    g.add_argument("--save-interval", type=int, default=5000, help="steps between resume checkpoints")
    g.add_argument("--no-save-optim", action="store_true", help="compatibility only")
    g.add_argument("--no-save-rng", action="store_true", help="compatibility only")
    g.add_argument("--load", type=str, default=None, help="checkpoint dir (tracker + <iter>/mp_rank_XX shards)")
    g.add_argument("--load-optimizer-states", "--load-oprimizer-states", dest="load_optimizer_states",
                   action="store_true", help="compatibility only (the misspelling is the original's)")
    g.add_argument("--load-lr-scheduler-states", action="store_true", help="compatibility only")
    g.add_argument("--no-load-optim", action="store_true", help="compatibility only")
    g.add_argument("--no-load-rng", action="store_true", help="compatibility only")
    g.add_argument("--finetune", action="store_true", help="compatibility only")
    g.add_argument("--resume-dataloader", action="store_true", help="compatibility only")
    g.add_argument("--log-file", type=str, default=None, help="also write the log to this file")
    g.add_argument("--distributed-backend", type=str, default=None, help="compatibility only")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")


def _add_eval_and_generation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation and generation")
    g.add_argument("--eval-batch-size", type=int, default=None, help="defaults to --batch-size")
    g.add_argument("--eval-iters", type=int, default=None, help="compatibility only")
    g.add_argument("--eval-interval", type=int, default=1000, help="steps between dev evaluations")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--length-penalty", type=float, default=None)
    g.add_argument("--no-repeat-ngram-size", type=int, default=None)
    g.add_argument("--out-seq-length", type=int, default=None, help="maximum new tokens per generated answer")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", type=str, default=None, help="folder holding {train,dev,test}<ext>, or one file")
    g.add_argument("--data-ext", type=str, default=None, help="file extension; defaults to the task's")
    g.add_argument("--data-name", type=str, default=None, help="task name (lcqmc, ccpm, c3, math, lcsts, adgen, wmtencn, sogou-log)")
    g.add_argument("--data-prefix", type=str, default=None, help="compatibility only")
    g.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--tokenizer-path", type=str, default=None, help="folder with vocab.txt, a vocab.txt, or a SentencePiece .model")
    g.add_argument("--seq-length", type=int, default=None, help="compatibility only")
    g.add_argument("--enc-seq-length", type=int, default=None, help="truncate encoder inputs to this many tokens")
    g.add_argument("--dec-seq-length", type=int, default=None, help="truncate targets to this many tokens")
    g.add_argument("--cache-dir", type=str, default=None, help="tokenised-data cache dir (default: beside the data)")


def _add_deepspeed(p: argparse.ArgumentParser) -> None:
    # Spelled as deepspeed.add_config_arguments spells them; defined here so parsing does not import DeepSpeed.
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true", help="accepted for the original scripts; DeepSpeed always runs")
    g.add_argument("--deepspeed_config", "--deepspeed-config", type=str, default=None, help="DeepSpeed JSON")
    g.add_argument("--deepscale", action="store_true", help="compatibility only")
    g.add_argument("--deepscale_config", type=str, default=None, help="deprecated alias of --deepspeed_config")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune_cpm2.py",
        description="Fine-tune or prompt-tune CPM-2 (and T5-family models) with DeepSpeed, from one CPU to many GPUs.",
        allow_abbrev=False,
    )
    _add_model(p)
    _add_precision(p)
    _add_training(p)
    _add_eval_and_generation(p)
    _add_data(p)
    _add_deepspeed(p)
    return p


def _explicitly_set(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    return {k for k, v in vars(args).items() if v != parser.get_default(k)}


def validate(args: argparse.Namespace) -> None:
    """Check flag combinations; raise ValueError with the fix. Runs before any work."""
    errors: list[str] = []
    if not (args.do_train or args.do_eval or args.do_infer or args.do_valid):
        errors.append("nothing to do: pass --do-train, --do-valid, --do-eval and/or --do-infer")
    if args.data_name is None:
        errors.append("--data-name is required (e.g. lcqmc)")
    if args.data_path is None:
        errors.append("--data-path is required (a folder holding train/dev/test files, or one file)")
    if args.tokenizer_path is None:
        errors.append("--tokenizer-path is required (a folder with vocab.txt, a vocab.txt, or a .model file)")
    if args.model_config is None:
        errors.append("--model-config is required (e.g. configs/model/cpm2_config.json)")
    if args.fp16 and args.bf16:
        errors.append("--fp16 and --bf16 are exclusive: pick one")
    if args.load is None and not args.random_init and not args.resume:
        errors.append("no weights: pass --load DIR (a checkpoint dir with latest_checkpointed_iteration.txt), "
                      "or --random-init to train from random weights on purpose")
    if args.load is not None and args.random_init:
        errors.append("--load and --random-init contradict each other: drop one")
    if args.do_train and args.save is None:
        errors.append("--do-train needs --save DIR (checkpoints, logs and predictions go there)")
    if (args.do_eval or args.do_infer or args.do_valid) and args.save is None:
        errors.append("evaluation writes predictions and metrics: pass --save DIR")
    if args.resume and args.save is None:
        errors.append("--resume continues from the checkpoint in --save: pass --save DIR")
    if args.prompt_tune and args.prompt_config is None:
        errors.append("--prompt-tune needs --prompt-config FILE (configs/prompt/<task>/*.json)")
    if args.prompt_config is not None and not args.prompt_tune:
        errors.append("--prompt-config is only used with --prompt-tune: add --prompt-tune or drop it")
    if args.load_prompt is not None and not args.prompt_tune:
        errors.append("--load-prompt needs --prompt-tune (and --prompt-config)")
    if args.model_parallel_size < 1:
        errors.append(f"--model-parallel-size must be >= 1, got {args.model_parallel_size}")
    for name in ("batch_size", "gradient_accumulation_steps", "epochs", "log_interval", "eval_interval", "save_interval"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for split in ("train", "dev", "test"):
        ratio = getattr(args, f"{split}_ratio")
        if ratio is not None and not 0 < ratio <= 1:
            errors.append(f"--{split}-ratio must be in (0, 1], got {ratio}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        errors.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.deepscale_config is not None:
        if args.deepspeed_config is not None:
            errors.append("--deepscale_config and --deepspeed_config both given: keep --deepspeed_config")
        args.deepspeed_config = args.deepscale_config
    if args.deepspeed_config is not None and not os.path.isfile(args.deepspeed_config):
        errors.append(f"--deepspeed_config {args.deepspeed_config} does not exist (configs/deepspeed/ holds the shipped ones)")
    for name in ("model_config", "prompt_config"):
        path = getattr(args, name)
        if path is not None and not os.path.isfile(path):
            errors.append(f"--{name.replace('_', '-')} {path} does not exist")
    if errors:
        raise ValueError("invalid arguments:\n  - " + "\n  - ".join(errors))
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    if args.max_save == -1 or args.max_save == 0:
        args.max_save = 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(args)
    args.compat_flags_set = sorted(k for k in _explicitly_set(args, parser) if k in COMPAT_ONLY_FLAGS)
    return args


def warn_compat_flags(args: argparse.Namespace) -> None:
    for name in getattr(args, "compat_flags_set", []):
        logger.warning("--%s is accepted for compatibility and has no effect: %s",
                       name.replace("_", "-"), COMPAT_ONLY_FLAGS[name])
