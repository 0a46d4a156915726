"""Prompt-tuning configuration and the placement of soft-prompt positions in the encoder ids.

Config files keep the original schema (``configs/prompt/<task>/*.json``, SPEC §7, ``reference/original-toolkit.md``
§6) plus three new optional keys: ``init_before_load``, ``init_mode`` and ``init_file``.

Soft-prompt position j (0..P-1) appears in the encoder ids as the negative id -(j+1); the model reads row j of
``encoder.prompt_embeds`` for it. Where the positions go is task-specific and follows the original exactly:
each task describes its layout with a :class:`PromptLayout` (data) and :meth:`PromptLayout.build` places them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

if TYPE_CHECKING:  # torch is imported lazily so that reading the task registry stays cheap
    import torch

__all__ = ["PromptSide", "PromptConfig", "PromptLayout", "prompt_ids", "prompt_attention_mask", "INIT_MODES"]

_TOP_KEYS_ORIGINAL = ("init_scratch", "fix_model", "init_from_vocab", "fix_prompt", "mask_prompt2token",
                      "mask_token2prompt", "enc", "dec")
_TOP_KEYS_NEW = ("init_before_load", "init_mode", "init_file")
_SIDE_KEYS = ("prompt_len", "init_tokens", "default_init_token", "ratio_list", "sample_from_vocab")

# How the prompt vectors get their first values (applied by the trainer):
#   "tokens":       rows init_token_ids() of the word embeddings (init_scratch / init_from_vocab in the original);
#   "random_vocab": rows of randomly sampled vocab ids (seeded by the run's seed);
#   "file":         a saved prompt tensor (init_file);
#   "checkpoint":   keep what the loaded checkpoint holds (the *_model_tune* configs), else the module's default.
INIT_MODES = ("tokens", "random_vocab", "file", "checkpoint")


def prompt_ids(start: int, end: int) -> list[int]:
    """Prompt positions ``start..end-1`` as encoder ids ``-(start+1)..-end`` (empty when end <= start)."""
    return [-(i + 1) for i in range(start, end)]


@dataclass(frozen=True)
class PromptSide:
    """The ``enc`` or ``dec`` block of a prompt config."""

    prompt_len: int = 0  # number of soft-prompt vectors (100 in every shipped config)
    init_tokens: str = ""  # text whose tokens initialise the first vectors
    default_init_token: str = "<mask>"  # pads init_tokens up to prompt_len
    ratio_list: Optional[tuple[float, ...]] = None  # position proportions; None = the task's default
    sample_from_vocab: bool = False  # init ids 100, 200, 300, ... instead of default_init_token


@dataclass(frozen=True)
class PromptConfig:
    """A parsed prompt config. Build it with :meth:`from_file` or :meth:`from_dict` (they validate)."""

    enc: PromptSide
    dec: PromptSide = PromptSide()
    init_scratch: bool = False  # initialise from the init_tokens rows (see init_before_load)
    # New: True reproduces the original's copy *before* the checkpoint load (100 copies of the random <mask> row);
    # False (default) copies the rows of the loaded, pretrained embeddings (SPEC §7).
    init_before_load: bool = False
    init_from_vocab: bool = False  # the original's after-load copy from the pretrained embeddings
    fix_model: bool = False  # train only the prompt
    fix_prompt: bool = False  # train everything except the prompt
    mask_prompt2token: bool = False  # prompts attend only to prompts
    mask_token2prompt: bool = False  # text tokens never attend to prompts
    init_mode_override: Optional[str] = None  # the "init_mode" key, when given
    init_file: Optional[str] = None  # a saved prompt tensor for init_mode "file"
    source: str = "<dict>"  # where it was read from, for error messages
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- construction --------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Union[str, "os.PathLike[str]"]) -> "PromptConfig":
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: prompt config is not valid JSON: {err.msg}") from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> "PromptConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a prompt config must be a JSON object")
        valid = _TOP_KEYS_ORIGINAL + _TOP_KEYS_NEW
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"{source}: unknown prompt-config key(s) {unknown}; valid keys: {', '.join(valid)}")
        if "enc" not in data:
            raise ValueError(f"{source}: missing the 'enc' block (prompt_len, init_tokens, ...)")
        flags = {key: _bool(data, key, source) for key in ("init_scratch", "init_before_load", "init_from_vocab",
                                                            "fix_model", "fix_prompt", "mask_prompt2token",
                                                            "mask_token2prompt")}
        init_mode = data.get("init_mode")
        if init_mode is not None and init_mode not in INIT_MODES:
            raise ValueError(f"{source}: init_mode {init_mode!r} is not one of {', '.join(INIT_MODES)}")
        init_file = data.get("init_file")
        config = cls(
            enc=_side(data["enc"], f"{source}: enc"),
            dec=_side(data.get("dec", {}), f"{source}: dec"),
            init_mode_override=init_mode,
            init_file=init_file,
            source=source,
            raw=json.loads(json.dumps(data)),
            **flags,
        )
        config._check()
        return config

    def _check(self) -> None:
        src = self.source
        if self.enc.prompt_len <= 0:
            raise ValueError(f"{src}: enc.prompt_len must be > 0 for prompt tuning, got {self.enc.prompt_len}")
        if self.dec.prompt_len != 0:
            # The original parsed dec.* but never built a decoder prompt; refusing beats silently ignoring it.
            raise ValueError(f"{src}: dec.prompt_len is {self.dec.prompt_len}; decoder prompts are not supported "
                             "(set it to 0)")
        if self.fix_model and self.fix_prompt:
            raise ValueError(f"{src}: fix_model and fix_prompt are both true, which leaves nothing to train")
        if self.init_before_load and self.init_mode != "tokens":
            raise ValueError(f"{src}: init_before_load needs token init (init_scratch: true), "
                             f"but the init mode is {self.init_mode!r}")
        if (self.init_mode == "file") != (self.init_file is not None):
            raise ValueError(f"{src}: init_file must be given exactly when init_mode is 'file'")
        ratios = self.enc.ratio_list
        if ratios is not None and sum(ratios) > 1.0 + 1e-6:
            raise ValueError(f"{src}: enc.ratio_list {list(ratios)} sums to {sum(ratios):.4g} > 1")

    # ---- accessors the rest of the toolkit uses ------------------------------------------------------------

    @property
    def prompt_len(self) -> int:
        return self.enc.prompt_len

    @property
    def ratio_list(self) -> Optional[tuple[float, ...]]:
        return self.enc.ratio_list

    @property
    def init_tokens(self) -> str:
        return self.enc.init_tokens

    @property
    def default_init_token(self) -> str:
        return self.enc.default_init_token

    @property
    def sample_from_vocab(self) -> bool:
        return self.enc.sample_from_vocab

    @property
    def init_mode(self) -> str:
        """The resolved init mode (see INIT_MODES): ``init_mode`` when given, else "tokens" for
        init_scratch / init_from_vocab, else "checkpoint"."""
        if self.init_mode_override is not None:
            return self.init_mode_override
        return "tokens" if (self.init_scratch or self.init_from_vocab) else "checkpoint"

    @property
    def has_attention_mask(self) -> bool:
        """True when a mask ablation is on and the collate needs per-example [L, L] encoder masks."""
        return self.mask_prompt2token or self.mask_token2prompt

    def init_token_ids(self, tokenizer: Any) -> list[int]:
        """The vocab rows that initialise the prompt (the original's ``init_ids``, ``finetune_cpm2.main``):
        ``encode(init_tokens)`` padded to prompt_len with ``default_init_token``, or, with sample_from_vocab,
        padded with 100, 200, 300, ... (the original's numbering restarts at 100 after the init tokens)."""
        ids = list(tokenizer.encode(self.init_tokens)) if self.init_tokens else []
        if len(ids) > self.prompt_len:
            raise ValueError(f"{self.source}: init_tokens gives {len(ids)} tokens, more than prompt_len "
                             f"{self.prompt_len}; shorten init_tokens or raise prompt_len")
        pad = self.prompt_len - len(ids)
        if self.sample_from_vocab:
            ids.extend(100 * (i + 1) for i in range(pad))
        else:
            try:
                pad_id = tokenizer.token_to_id(self.default_init_token)
            except KeyError:
                raise ValueError(f"{self.source}: default_init_token {self.default_init_token!r} is not a token of "
                                 "the loaded vocab") from None
            ids.extend([pad_id] * pad)
        vocab_size = getattr(tokenizer, "vocab_size", None)
        if vocab_size is not None and max(ids) >= vocab_size:
            raise ValueError(f"{self.source}: init id {max(ids)} is outside the vocab (size {vocab_size})")
        return ids

    def to_dict(self) -> dict:
        """The config as given (JSON-able): what a dataset cache key should hash."""
        return json.loads(json.dumps(self.raw))


def _bool(data: Mapping[str, Any], key: str, source: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _side(data: Any, source: str) -> PromptSide:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source} must be a JSON object")
    unknown = sorted(set(data) - set(_SIDE_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {', '.join(_SIDE_KEYS)}")
    prompt_len = data.get("prompt_len", 0)
    if not isinstance(prompt_len, int) or isinstance(prompt_len, bool) or prompt_len < 0:
        raise ValueError(f"{source}.prompt_len must be a non-negative integer, got {prompt_len!r}")
    ratios = data.get("ratio_list")
    if ratios is not None:
        if (not isinstance(ratios, list) or not ratios
                or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and 0 <= r <= 1 for r in ratios)):
            raise ValueError(f"{source}.ratio_list must be a list of numbers in [0, 1], got {ratios!r}")
        ratios = tuple(float(r) for r in ratios)
    for key in ("init_tokens", "default_init_token"):
        if key in data and not isinstance(data[key], str):
            raise ValueError(f"{source}.{key} must be a string, got {data[key]!r}")
    sample = data.get("sample_from_vocab", False)
    if not isinstance(sample, bool):
        raise ValueError(f"{source}.sample_from_vocab must be true or false, got {sample!r}")
    return PromptSide(prompt_len=prompt_len, init_tokens=data.get("init_tokens", ""),
                      default_init_token=data.get("default_init_token", "<mask>"), ratio_list=ratios,
                      sample_from_vocab=sample)


@dataclass(frozen=True)
class PromptLayout:
    """Where one task puts its prompt positions around its text segments t_0 .. t_{m-1} (data, per task).

    With n = prompt_len, r = ratio_list and c_i = int((r[g_0] + ... + r[g_i]) * n) for g = ``gap_ratios``
    (the original's float arithmetic and ``int()`` truncation, so 0.33/0.34/0.33 gives 33, 67, 100)::

        P[k..c_0) t_0 (；) P[c_0..c_1) t_1 ... (；) P[c_{m-2}..c_{m-1}) t_{m-1} P[c_{m-1}..end)

    * k = ``per_option`` x number of options: C3 and CCPM put ``per_option`` (3) positions before each option,
      numbered first, inside the options segment the task builds with :meth:`option_prompt`;
    * ``；`` is inserted before an inner gap whose ratio is 0 (the original's ``med_token``);
    * end = n, except when ``gap_ratios`` also sizes the trailing gap (Math / LCSTS / WMT: (0, 2), so r[1] is
      ignored and end = c_1 = int((r0 + r2) * n));
    * ``uses_ratio_list`` False: the config's ratio_list is ignored (AdGen puts all n positions in front).
    """

    default_ratios: tuple[float, ...]
    gap_ratios: tuple[int, ...]
    uses_ratio_list: bool = True
    per_option: int = 0

    def ratios(self, config: PromptConfig) -> tuple[float, ...]:
        ratios = config.ratio_list if (self.uses_ratio_list and config.ratio_list is not None) else self.default_ratios
        need = max(self.gap_ratios) + 1
        if len(ratios) < need:
            raise ValueError(f"{config.source}: enc.ratio_list {list(ratios)} has {len(ratios)} entries; this task "
                             f"reads {need} (entries {sorted(set(self.gap_ratios))})")
        return ratios

    def cuts(self, config: PromptConfig) -> list[int]:
        ratios, total, cuts = self.ratios(config), 0.0, []
        for index in self.gap_ratios:
            total += ratios[index]
            cuts.append(int(total * config.prompt_len))
        return cuts

    @staticmethod
    def option_prompt(option_index: int, per_option: int) -> list[int]:
        """The prompt positions placed before option ``option_index`` (C3/CCPM: 3 each, numbered from 0)."""
        return prompt_ids(per_option * option_index, per_option * (option_index + 1))

    def build(self, segments: Sequence[list[int]], config: PromptConfig, *, sep_id: Optional[int] = None,
              num_options: int = 0, body: Optional[int] = None, max_len: Optional[int] = None) -> list[int]:
        """Encoder ids with prompt positions placed around ``segments``.

        ``body``: index of the segment shortened first when ``max_len`` is exceeded (the passage).
        Raises ValueError when the ratios would place a prompt position twice or past prompt_len.
        """
        n, reserved = config.prompt_len, self.per_option * num_options
        ratios, cuts = self.ratios(config), self.cuts(config)
        inner = len(segments)  # cuts[0..m-1] end the gaps before segments; cuts[m], if any, ends the trailing gap
        if len(cuts) not in (inner, inner + 1):
            raise ValueError(f"layout has {len(cuts)} gap ratios for {inner} segments")
        end = cuts[inner] if len(cuts) > inner else n
        if reserved > n:
            raise ValueError(f"{config.source}: {num_options} options take {reserved} prompt positions, more than "
                             f"prompt_len {n}")
        if cuts[0] < reserved:
            # The original then reused positions 0..k-1 in the next gap (two places sharing one vector).
            raise ValueError(f"{config.source}: ratio_list {list(ratios)} puts {cuts[0]} prompt positions in front, "
                             f"fewer than the {reserved} used before the {num_options} options; positions would "
                             f"repeat. Raise ratio_list[0] to at least {reserved / n:.2f}")
        if max(cuts) > n:
            raise ValueError(f"{config.source}: ratio_list {list(ratios)} places positions past prompt_len {n}")
        pieces: list[list[int]] = [prompt_ids(reserved, cuts[0])]
        body_piece = None
        for i, segment in enumerate(segments):
            if i > 0:
                gap_ratio = ratios[self.gap_ratios[i]]
                if gap_ratio == 0 and sep_id is None:
                    raise ValueError("this layout inserts a separator before an empty inner gap; pass sep_id")
                pieces.append(([sep_id] if gap_ratio == 0 else []) + prompt_ids(cuts[i - 1], cuts[i]))
            if i == body:
                body_piece = len(pieces)
            pieces.append(list(segment))
        pieces.append(prompt_ids(cuts[inner - 1], end))
        return join_truncating(pieces, body_piece, max_len)


def join_truncating(pieces: Sequence[list[int]], body: Optional[int], max_len: Optional[int]) -> list[int]:
    """Concatenate ``pieces``; over ``max_len``, shorten ``pieces[body]`` (the passage) first, then cut the end.

    The original cut the finished sequence (C3: ``enc_input_ids[:768]``). Shortening the passage gives the same
    ids whenever the passage is last, and keeps what follows it (e.g. trailing prompt positions) otherwise.
    """
    total = sum(len(p) for p in pieces)
    if max_len is None or total <= max_len:
        return [i for p in pieces for i in p]
    pieces = [list(p) for p in pieces]
    if body is not None:
        excess = total - max_len
        pieces[body] = pieces[body][: max(0, len(pieces[body]) - excess)]
    return [i for p in pieces for i in p][:max_len]


def prompt_attention_mask(enc_ids: Sequence[int], config: PromptConfig) -> "torch.Tensor":
    """Encoder self-attention mask ``[L, L]`` (bool, True = query i may attend to key j) for the ablations.

    With P(i) = "position i is a prompt" (id < 0), as the original built it (``CPM2Datasets.py``):
      * ``mask_prompt2token``: allowed iff P(i) and P(j), or not P(i): prompts see only prompts;
      * ``mask_token2prompt``: allowed iff P(i) and P(j), or not P(j): text never sees prompts.
    Both flags together apply both (the original let the second overwrite the first). Neither: all True.
    The collate pads it into ``[B, 1, Le, Le]`` (zeros for padding).
    """
    import torch

    is_prompt = torch.tensor(list(enc_ids), dtype=torch.long) < 0  # [L]
    length = is_prompt.numel()
    allowed = torch.ones(length, length, dtype=torch.bool)  # [Lq, Lk]
    if config.mask_prompt2token:
        allowed &= ~is_prompt[:, None] | is_prompt[None, :]
    if config.mask_token2prompt:
        allowed &= is_prompt[:, None] | ~is_prompt[None, :]
    return allowed


def as_prompt_config(prompt: Union[None, PromptConfig, Mapping[str, Any]]) -> Optional[PromptConfig]:
    """Accept a parsed config, a raw config dict (the original's JSON), or None (full fine-tuning)."""
    if prompt is None or isinstance(prompt, PromptConfig):
        return prompt
    return PromptConfig.from_dict(prompt)
