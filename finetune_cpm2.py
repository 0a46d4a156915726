"""Fine-tune or prompt-tune CPM-2 (and T5-family models) with DeepSpeed; evaluate; write predictions.

Wiring only: args -> distributed -> tokenizer, task, model (weights loaded) -> engine -> train / evaluate / infer.
Run `python finetune_cpm2.py --help`, or the scripts under scripts/full_model and scripts/prompt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

if __name__ == "__main__":  # before torch allocates anything: glibc reads its malloc tunables once, at start-up
    from training.allocator import reexec_with_tuned_malloc

    reexec_with_tuned_malloc()

import torch  # noqa: E402

from arguments import parse_args, warn_compat_flags  # noqa: E402
from training.setup import has_gpu, init_distributed, set_seed, setup_logging, teardown

logger = logging.getLogger("cpm2")


def check_save_dir(path: str) -> None:
    """Fail at start-up, not after hours of training, when the output dir cannot be written."""
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())  # a full disk may only say so here
    except OSError as e:
        raise RuntimeError(f"--save {path} is not writable ({e.strerror or e}); choose another dir or free space") from e
    finally:
        if os.path.exists(probe):  # also after a failed write: leave nothing behind
            os.remove(probe)


def generation_config(args, task, tokenizer):
    from model.generation import GenerationConfig

    d = task.decoding
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    top_k, top_p = pick(args.top_k, d.top_k), pick(args.top_p, d.top_p)
    return GenerationConfig(
        max_length=pick(args.out_seq_length, d.out_seq_length),
        do_sample=d.do_sample or bool(args.top_k) or (args.top_p is not None and args.top_p < 1.0),
        top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0,
        temperature=pick(args.temperature, d.temperature), num_beams=pick(args.num_beams, d.num_beams),
        length_penalty=pick(args.length_penalty, d.length_penalty),
        no_repeat_ngram_size=pick(args.no_repeat_ngram_size, d.no_repeat_ngram_size),
        eos_id=tokenizer.get_sentinel_id(1), pad_id=tokenizer.pad_id,
        decoder_prefix=[tokenizer.decoder_start_id, tokenizer.get_sentinel_id(0)])


def build_model(args, dist, tokenizer, prompt_cfg):
    from model import EncDecConfig, EncDecModel
    from model.checkpoint import load_checkpoint
    from training import prompt_tuning
    from training.state import checkpoint_root, latest_step

    prompt_only = prompt_cfg is not None and prompt_cfg.fix_model
    if args.resume and prompt_only and latest_step(args.save) is not None:
        # The resume checkpoint holds the prompt alone: the frozen weights must come from the same base.
        prompt_tuning.check_resume_base(checkpoint_root(args.save), load=args.load, seed=args.seed)
    if prompt_cfg is not None and args.do_train and args.save and dist.is_main:
        for where in (checkpoint_root(args.save), os.path.join(args.save, "best")):
            prompt_tuning.write_prompt_metadata(where, prompt_cfg, load=args.load, seed=args.seed)
    config = EncDecConfig.from_json_file(args.model_config)
    config.vocab_size = tokenizer.vocab_size
    model = EncDecModel(config, parallel_output=True, checkpoint_activations=args.checkpoint_activations,
                        prompt_config=prompt_cfg.raw if prompt_cfg else None)
    # Store weights in the training dtype before loading, so an 11B fp16 checkpoint never exists in fp32.
    if args.fp16:
        model.half()
    elif args.bf16:
        model.bfloat16()
    model.to(dist.device)
    if prompt_cfg is not None and prompt_cfg.init_before_load:
        logger.info("prompt init before loading (init_before_load): %s",
                    prompt_tuning.init_prompt(model, prompt_cfg, tokenizer, seed=args.seed))
    if args.load:
        allow = ("encoder.prompt_embeds.weight",) if prompt_cfg is not None else ()
        info = load_checkpoint(model, args.load, allow_missing=allow)
        logger.info("loaded %s (iteration %s, saved at MP %d) at MP %d", args.load, info.iteration,
                    info.source_mp_size, dist.mp_size)
    else:
        logger.warning("--random-init: training from random weights (no --load)")
    if prompt_cfg is not None and not prompt_cfg.init_before_load:
        logger.info("prompt init: %s", prompt_tuning.init_prompt(model, prompt_cfg, tokenizer, seed=args.seed))
    if args.load_prompt:
        prompt_tuning.load_prompt(model, args.load_prompt)
    trainable, total = prompt_tuning.set_trainable(model, prompt_cfg)
    logger.info("model: %s parameters on this rank, %s trainable (%.4f%%)", f"{total:,}", f"{trainable:,}",
                100.0 * trainable / max(total, 1))
    if args.compile:
        model.compile_training_forward()
        logger.info("--compile: the training forward runs through torch.compile (the first steps compile it; "
                    "evaluation and generation stay eager)")
    return model


def build_engine(args, dist, model, train_batches, prompt_only):
    from training.engine import OptimSettings, build_ds_config, build_engine as make_engine
    from training.loop import total_train_steps

    steps = total_train_steps(args.train_iters, args.epochs, train_batches.micro_batches_per_epoch,
                              args.gradient_accumulation_steps)
    s = OptimSettings(lr=args.lr, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
                      micro_batch_size=args.batch_size, grad_acc_steps=args.gradient_accumulation_steps,
                      dp_size=dist.dp_size, fp16=args.fp16, bf16=args.bf16,
                      warmup_steps=int(args.warmup * steps), decay_steps=args.lr_decay_iters or steps,
                      decay_style=args.lr_decay_style, loss_scale=args.loss_scale,
                      loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis, min_scale=args.min_scale)
    ds_config = build_ds_config(args.deepspeed_config, s)
    engine, _, _ = make_engine(model, s, ds_config, prompt_only=prompt_only)
    return engine, steps


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")), args.log_file)
    warn_compat_flags(args)
    gpu = has_gpu()
    if not gpu and args.fp16:
        raise ValueError("--fp16 needs a GPU (DeepSpeed's CPU accelerator refuses fp16): drop --fp16 to train in "
                         "fp32 on CPU (the shipped scripts do this automatically)")
    dist = init_distributed(args.model_parallel_size)
    logger.info("device: %s | backend %s | world %d = MP %d x DP %d | precision %s", "GPU" if gpu else "CPU",
                dist.backend, dist.world_size, dist.mp_size, dist.dp_size,
                "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32")
    sink = None
    try:
        if dist.is_main:
            check_save_dir(args.save)
            with open(os.path.join(args.save, "args.json"), "w", encoding="utf-8") as f:
                json.dump(vars(args), f, indent=1, default=str)
        set_seed(args.seed)
        sink = run(args, dist)
    finally:
        if sink is not None:
            sink.close()
    # Not in the finally: after a dead peer, destroying the groups blocks on their workers before the error
    # could be reported. The handlers under __main__ tear down after reporting.
    teardown()
    return 0


def run(args, dist):
    from data_utils.prompt import PromptConfig
    from data_utils.tasks import get_task
    from tokenization_enc_dec import load_tokenizer
    from training.best import BestCheckpoints
    from training.data import EvalBatches, TrainBatches
    from training.datasets import build_dataset, make_batch_collate
    from training.evaluation import EvalContext
    from training.loop import LoopSettings, Trainer
    from training.objectives import loss_for_kind
    from training.reporting import MetricsSink
    from training.state import load_resume_checkpoint

    tokenizer = load_tokenizer(args.tokenizer_path)
    task = get_task(args.data_name)
    prompt_cfg = PromptConfig.from_file(args.prompt_config) if args.prompt_tune else None
    prompt_only = bool(prompt_cfg and prompt_cfg.fix_model)
    # Read and tokenise every split first: bad data fails before any model memory is spent.
    splits = {"train": args.do_train, "dev": args.do_valid, "test": args.do_eval, "infer": args.do_infer}
    data = {name: build_dataset(args, task, tokenizer, name, prompt_cfg) for name, wanted in splits.items() if wanted}
    collate = make_batch_collate(task, tokenizer, prompt_cfg)
    model = build_model(args, dist, tokenizer, prompt_cfg)
    score_token = tokenizer.token_to_id(task.score_token) if getattr(task, "score_token", None) else None
    eval_ctx = EvalContext(model=model, task=task, tokenizer=tokenizer, device=dist.device,
                           gen_config=generation_config(args, task, tokenizer) if task.kind == "generate" else None,
                           score_token_id=score_token, show_progress=dist.is_main, seed=args.seed)
    eval_batches = {name: EvalBatches(ds, collate, batch_size=args.eval_batch_size, dp_rank=dist.dp_rank,
                                      dp_size=dist.dp_size, num_workers=args.num_workers)
                    for name, ds in data.items() if name != "train"}
    sink = MetricsSink(args.save, enabled=dist.is_main)
    best = BestCheckpoints(args.save, args.max_save, task.main_metric)

    if args.do_train:
        train = TrainBatches(data["train"], collate, batch_size=args.batch_size, seed=args.seed,
                             dp_rank=dist.dp_rank, dp_size=dist.dp_size, num_workers=args.num_workers)
        engine, steps = build_engine(args, dist, model, train, prompt_only)
        settings = LoopSettings(epochs=args.epochs, train_iters=steps, grad_acc_steps=args.gradient_accumulation_steps,
                                log_interval=args.log_interval, eval_interval=args.eval_interval,
                                save_interval=args.save_interval, do_valid=args.do_valid, save_dir=args.save,
                                seed=args.seed, fp16=args.fp16, max_nonfinite_steps=args.max_nonfinite_steps,
                                prompt_only=prompt_only)
        dev = (data["dev"], eval_batches["dev"]) if "dev" in data else None
        trainer = Trainer(engine=engine, model=model, loss_fn=loss_for_kind(task.kind, score_token_id=score_token),
                          make_train_batches=train, micro_batches_per_epoch=train.micro_batches_per_epoch, dev=dev,
                          eval_ctx=eval_ctx, settings=settings, sink=sink, best=best, main_metric=task.main_metric,
                          is_main=dist.is_main, device=dist.device)
        if args.resume:
            state = load_resume_checkpoint(engine, args.save, frozen_excluded=prompt_only)
            if state is None:
                logger.info("--resume: no checkpoint in %s/checkpoints yet, starting from the beginning", args.save)
            else:
                trainer.load_state_dict(state)
        logger.info("training: %d examples, %d steps (%d epochs x %d micro-batches of %d per DP rank, grad acc %d)",
                    len(data["train"]), steps, args.epochs, train.micro_batches_per_epoch, args.batch_size,
                    args.gradient_accumulation_steps)
        # ZeRO and bf16 optimizers hook every parameter's gradient accumulator; those hooks live in C++ and
        # reference the optimizer and with it the process groups, so without destroy() the groups outlive teardown
        # (training.setup.teardown). Evaluation below uses the model, not the engine. After a collective failure
        # the engine is left alone (destroy() synchronises the device, which could wait on the dead peer): that
        # process leaves without interpreter shutdown (see __main__).
        try:
            trainer.train()
        except BaseException as e:
            if not is_collective_failure(e):
                engine.destroy()
            raise
        engine.destroy()
        if best.best_step is not None and (args.do_eval or args.do_infer):
            restore_best(model, args.save, prompt_only)
    elif args.do_valid:
        evaluate_and_write(eval_ctx, data["dev"], eval_batches["dev"], args.save, "dev", sink)
    for split in ("test", "infer"):
        if split in data:
            evaluate_and_write(eval_ctx, data[split], eval_batches[split], args.save, split, sink)
    return sink


def restore_best(model, save_dir: str, prompt_only: bool) -> None:
    from model.checkpoint import load_checkpoint
    from training.prompt_tuning import load_prompt

    best_dir = os.path.join(save_dir, "best")
    if prompt_only:
        load_prompt(model, best_dir)
    else:
        load_checkpoint(model, best_dir)
    logger.info("restored the best checkpoint from %s for the final evaluation", best_dir)


def evaluate_and_write(ctx, dataset, batches, save_dir: str, split: str, sink) -> None:
    from training.evaluation import run_evaluation, write_results

    metrics, records = run_evaluation(ctx, dataset, batches(), desc=split)
    if int(os.environ.get("RANK", "0")) == 0:
        write_results(save_dir, split, metrics, records)
    sink.write(-1, split, metrics)
    logger.info("%s: %s -> %s/%s/", split, json.dumps(metrics, ensure_ascii=False), save_dir, split)


def is_collective_failure(e: BaseException) -> bool:
    import torch.distributed as dist

    # gloo's "Connection reset by peer" / "Timed out" arrive as plain RuntimeErrors; NCCL's as DistBackendError.
    markers = ("gloo", "nccl", "processgroup", "connection reset by peer", "connection closed by peer")
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and any(m in str(e).lower() for m in markers))


def explain_failure(e: BaseException) -> str:
    """The one-line message for an error a user can act on (bad flags, data, checkpoint, disk, a dead peer)."""
    rank = os.environ.get("RANK", "0")
    if is_collective_failure(e):
        # gloo/NCCL name the peer's address, not its rank; the launcher's report and the dead rank's own
        # log lines (every rank logs warnings and errors) name it.
        return (f"rank {rank}: a collective operation failed, most likely because another process of this run "
                f"died or hung (see the launcher's failure report and the other ranks' log lines, which name "
                f"the rank; CPM2_DIST_TIMEOUT_MINUTES bounds the wait for a hung one): {e}")
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        # e.g. ENOSPC / EACCES while writing a checkpoint or predictions: every write is atomic, so the
        # previous checkpoint and tracker are intact and --resume continues from them once there is space.
        return (f"rank {rank}: cannot write {e.filename or 'an output file'} ({e.strerror or e}); free space or "
                f"fix permissions, then rerun with --resume: the previous checkpoint is intact")
    return str(e)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # FileNotFoundError is an OSError
        message = explain_failure(e)
        logging.getLogger("cpm2").error("%s", message)
        print(f"error: {message}", file=sys.stderr)
        if is_collective_failure(e):
            # After a dead or hung peer the process group's threads cannot be joined cleanly: a normal interpreter
            # exit then sometimes ended in "terminate called without an active exception" (SIGABRT) instead of
            # exit code 2. Flush everything, then leave without running the C++ destructors. The pause first lets a
            # launcher (torchrun, deepspeed) see the peer that died before it sees us: its report names the first
            # failure it observes, and that should be the dead rank, not this survivor.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            time.sleep(2.0)
            os._exit(2)
    # A handled error that is not a collective failure: the peers (if any) are alive, and the except block has
    # released the traceback whose frames held the engine, so the groups can be destroyed and their threads joined.
    teardown()
    sys.exit(2)
