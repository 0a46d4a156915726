"""Prompt tuning on the training side: every init mode does what it says (in-process, through
finetune_cpm2.build_model), what trains under fix_model / fix_prompt / model tuning, and end-to-end runs:
a frozen random model that is at chance learns a separable set through its prompt alone."""
from __future__ import annotations

import importlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.prompt.common import (PROMPT_LEN, make_base_checkpoint, make_prompt_task, metrics, predictions, same_metrics,
                                 prompt_config, saved_prompt, tiny_model, write_json)
from tests.training.helpers import TINY_CONFIG, base_args, model_weights, run_finetune

PROMPT_KEY = "encoder.prompt_embeds.weight"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt_task")
    data, vocab = make_prompt_task(root)
    base = make_base_checkpoint(vocab, root / "base")
    return data, vocab, base


# ---- init modes, in-process through the real build_model ---------------------------------------------------------

def build(vocab: Path, cfg: dict, tmp_path: Path, *, load: Path | None, load_prompt: Path | None = None, seed=5):
    from data_utils.prompt import PromptConfig
    from tokenization_enc_dec import load_tokenizer

    finetune = importlib.import_module("finetune_cpm2")
    args = SimpleNamespace(model_config=str(TINY_CONFIG), fp16=False, bf16=False, checkpoint_activations=False,
                           load=str(load) if load else None, seed=seed, resume=False, save=str(tmp_path / "save"),
                           do_train=False, load_prompt=str(load_prompt) if load_prompt else None, compile=False)
    dist = SimpleNamespace(device=torch.device("cpu"), mp_size=1, is_main=True)
    torch.manual_seed(seed)  # main() seeds before building; the random init of the model depends on it
    return finetune.build_model(args, dist, load_tokenizer(str(vocab)), PromptConfig.from_dict(cfg))


def loaded_rows(base: Path, ids) -> torch.Tensor:
    return model_weights(base)["word_embeds.weight"][torch.tensor(ids)]


def test_init_modes_copy_the_rows_they_name(task, tmp_path):
    from tokenization_enc_dec import load_tokenizer

    _, vocab, base = task
    tok = load_tokenizer(str(vocab))
    mask = tok.token_to_id("<mask>")

    # init_scratch (default): P copies of the LOADED <mask> row
    model = build(vocab, prompt_config(), tmp_path, load=base)
    prompt = model.encoder.prompt_embeds.weight.detach()
    assert torch.equal(prompt, loaded_rows(base, [mask] * PROMPT_LEN))

    # init_tokens first, padded with default_init_token
    words = tok.encode("相似矛盾")
    model = build(vocab, prompt_config(enc={"init_tokens": "相似矛盾"}), tmp_path, load=base)
    want = loaded_rows(base, words + [mask] * (PROMPT_LEN - len(words)))
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), want)

    # init_before_load: the original's copy of the RANDOM-INIT <mask> row, made before the weights arrive
    model = build(vocab, prompt_config(init_before_load=True), tmp_path, load=base)
    random_init = tiny_model(vocab, seed=5, prompt_config=prompt_config())  # the same draws build_model makes
    before = random_init.word_embeds.weight.detach()[[mask] * PROMPT_LEN]
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), before)
    assert not torch.equal(before, loaded_rows(base, [mask] * PROMPT_LEN))
    assert torch.equal(model.word_embeds.weight.detach(), model_weights(base)["word_embeds.weight"])  # still loaded

    # sample_from_vocab: ids 100, 200, 300
    cfg = prompt_config(enc={"prompt_len": 3, "sample_from_vocab": True, "ratio_list": [1.0, 0.0, 0.0]})
    model = build(vocab, cfg, tmp_path, load=base)
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), loaded_rows(base, [100, 200, 300]))

    # random_vocab: seeded sample of loaded rows
    model = build(vocab, prompt_config(init_mode="random_vocab"), tmp_path, load=base)
    emb = model_weights(base)["word_embeds.weight"]
    rows = model.encoder.prompt_embeds.weight.detach()
    picked = [int((emb == row).all(-1).nonzero()[0]) for row in rows]  # every row is a loaded vocab row
    assert len(set(picked)) > 1
    again = build(vocab, prompt_config(init_mode="random_vocab"), tmp_path, load=base)
    assert torch.equal(again.encoder.prompt_embeds.weight, model.encoder.prompt_embeds.weight)

    # file: a saved prompt (the .pt of a prompt-only checkpoint)
    from model.checkpoint import save_model_checkpoint, write_tracker

    value = torch.randn(PROMPT_LEN, 64)
    save_model_checkpoint({PROMPT_KEY: value}, tmp_path / "p", 7, mp_rank=0, mp_size=1)
    write_tracker(tmp_path / "p", 7)
    model = build(vocab, prompt_config(init_mode="file", init_file=str(tmp_path / "p")), tmp_path, load=base)
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), value)

    # --load-prompt wins over any init, and "checkpoint" mode keeps the module's seeded default without it
    model = build(vocab, prompt_config(), tmp_path, load=base, load_prompt=tmp_path / "p")
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), value)
    model = build(vocab, prompt_config(init_scratch=False), tmp_path, load=base)
    assert torch.equal(model.encoder.prompt_embeds.weight.detach(), random_init.encoder.prompt_embeds.weight.detach())


@pytest.mark.parametrize("flags, trains_prompt, trains_model", [
    ({"fix_model": True}, True, False),
    ({"fix_model": False, "fix_prompt": True}, False, True),
    ({"fix_model": False}, True, True),  # *_model_tune.json: prompt and model
])
def test_trainable_params_and_optimizer_groups(task, flags, trains_prompt, trains_model):
    from data_utils.prompt import PromptConfig
    from training.engine import OptimSettings, build_optimizer
    from training.prompt_tuning import set_trainable

    _, vocab, _ = task
    cfg = PromptConfig.from_dict(prompt_config(**flags))
    model = tiny_model(vocab, prompt_config=cfg.raw)
    trainable, total = set_trainable(model, cfg)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads.pop(PROMPT_KEY) is trains_prompt
    assert set(grads.values()) == {trains_model}
    s = OptimSettings(lr=0.1, weight_decay=0.01, clip_grad=1.0, micro_batch_size=1, grad_acc_steps=1, dp_size=1,
                      fp16=False, bf16=False, warmup_steps=0, decay_steps=1, decay_style="constant")
    optimizer = build_optimizer(model, s, prompt_only=cfg.fix_model)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable
    assert (trainable == total) == (trains_model and trains_prompt)


# ---- end to end -----------------------------------------------------------------------------------------------

def write_separable_set(path: Path, n: int = 16) -> Path:
    """LCQMC-format pairs whose label is decided by the verb of the sentence (相似 for 喜欢/想要/需要/知道,
    矛盾 for 看见/买了/找到/相信): a property of the input that a prompt can learn to read out. test = train."""
    from tools.make_demo_data import OBJECTS, SUBJECTS

    rng = random.Random(1)
    verbs = {1: ["喜欢", "想要", "需要", "知道"], 0: ["看见", "买了", "找到", "相信"]}
    rows = []
    for i in range(n):
        text = rng.choice(SUBJECTS) + rng.choice(verbs[i % 2]) + rng.choice(OBJECTS)
        rows.append({"sentence1": text, "sentence2": text, "label": i % 2})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        (path / f"{split}.jsonl").write_text(text, encoding="utf-8")
    return path


def test_frozen_random_model_learns_through_its_prompt_alone(task, tmp_path):
    """A frozen random tiny model is at chance on a separable set; 20 prompt vectors trained with fix_model take it
    to 100% train accuracy. The base weights are untouched: reloading BASE + the saved prompt reproduces the final
    evaluation exactly, and the prompt moved away from its init."""
    from model.checkpoint import save_model_checkpoint, write_tracker

    _, vocab, _ = task
    data = write_separable_set(tmp_path / "sep")
    # Weights drawn with std 0.15 (not 0.02) so that a signal crosses the random layers at all.
    model = tiny_model(vocab, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else None
    base = tmp_path / "base"
    save_model_checkpoint(model, base, 1, mp_rank=0, mp_size=1)
    write_tracker(base, 1)
    cfg = write_json(tmp_path / "p20.json", prompt_config(enc={"prompt_len": 20}))
    common = ["--load", str(base), "--prompt-tune", "--prompt-config", str(cfg), "--seed", "3",
              "--eval-batch-size", "32"]

    untrained = tmp_path / "untrained"
    run_finetune(base_args(data, vocab, untrained, *common, "--do-eval"))
    chance = metrics(untrained, "test")["accuracy"]
    # 16 balanced examples: a chance-level model scores 13/16 or more with probability ~1% (binomial).
    assert chance <= 0.75, chance

    trained = tmp_path / "trained"
    run_finetune(base_args(data, vocab, trained, *common, "--do-train", "--do-valid", "--do-eval", "--batch-size", "8",
                           "--lr", "0.3", "--lr-decay-style", "constant", "--train-iters", "100", "--epochs", "1000",
                           "--log-interval", "10", "--eval-interval", "50", "--save-interval", "1000"))
    final = metrics(trained, "test")
    assert final["accuracy"] == 1.0, (chance, final)
    init = build(vocab, prompt_config(enc={"prompt_len": 20}), tmp_path, load=base).encoder.prompt_embeds.weight
    assert (saved_prompt(trained / "best") - init.detach()).abs().max() > 0.1

    again = tmp_path / "again"
    run_finetune(base_args(data, vocab, again, *common, "--load-prompt", str(trained / "best"), "--do-eval"))
    assert same_metrics(metrics(again, "test"), final)
    assert predictions(again, "test") == predictions(trained, "test")


@pytest.mark.slow
def test_fix_prompt_model_tune_and_mask_ablations_run(task, tmp_path):
    """Continue from a tuned prompt: fix_prompt trains the model and keeps the prompt bit-identical, model tuning
    (*_model_tune.json) trains both; the mask_prompt2token / mask_token2prompt ablations ([B,1,L,L] masks) train
    end to end and change the outcome."""
    data, vocab, base = task
    args = ["--load", str(base), "--prompt-tune", "--do-train", "--do-valid", "--batch-size", "8", "--lr", "0.05",
            "--train-iters", "3", "--eval-interval", "3", "--save-interval", "3", "--log-interval", "1", "--seed", "3"]
    masks = tmp_path / "masks"
    cfg = write_json(tmp_path / "mask.json", prompt_config(mask_prompt2token=True, mask_token2prompt=True))
    run_finetune(base_args(data, vocab, masks, *args, "--prompt-config", str(cfg)))
    plain = tmp_path / "plain"
    run_finetune(base_args(data, vocab, plain, *args, "--prompt-config", str(write_json(tmp_path / "p.json",
                                                                                          prompt_config()))))
    loss = lambda save: [json.loads(line)["loss"] for line in open(save / "metrics.jsonl") if '"train"' in line]  # noqa
    assert all(v == v for v in loss(masks)) and loss(masks) != loss(plain)

    tuned = saved_prompt(plain / "best")
    fixp = tmp_path / "fix_prompt"
    cfg = write_json(tmp_path / "fp.json", prompt_config(init_scratch=False, fix_model=False, fix_prompt=True))
    run_finetune(base_args(data, vocab, fixp, *args, "--prompt-config", str(cfg),
                           "--load-prompt", str(plain / "best")))
    after = model_weights(fixp / "best")  # a full checkpoint: the model trained
    assert torch.equal(after.pop(PROMPT_KEY), tuned)
    before = model_weights(base)
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) > len(before) // 2, changed

    both = tmp_path / "model_tune"
    cfg = write_json(tmp_path / "mt.json", prompt_config(init_scratch=False, fix_model=False))
    run_finetune(base_args(data, vocab, both, *args, "--prompt-config", str(cfg), "--load-prompt", str(plain / "best")))
    after = model_weights(both / "best")
    assert not torch.equal(after.pop(PROMPT_KEY), tuned)
    assert sum(not torch.equal(before[n], after[n]) for n in before) > len(before) // 2
