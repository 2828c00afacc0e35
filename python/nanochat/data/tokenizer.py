"""Byte-level BPE tokenizer: a thin wrapper over HF ``tokenizers`` (never a hand-written BPE).

Notable choices:
- GPT-2 style byte-level BPE: ``ByteLevel`` pre-tokenizer with the GPT-2 regex and
  ``add_prefix_space=False``, ``ByteLevel`` decoder, and all 256 byte symbols in the initial alphabet,
  so every string encodes without an unknown token. This is exactly what llama.cpp reproduces with
  ``tokenizer.ggml.model = "gpt2"`` and ``tokenizer.ggml.pre = "gpt-2"``, so GGUF exports tokenize the same.
- Special tokens take the first ids, in the order of :data:`SPECIAL_TOKENS` (``<|bos|>`` is 0), then the
  256 byte symbols, then the merges. The fill-in-the-middle sentinels (:data:`FIM_TOKENS`) come last among the
  specials, so the older ids do not move; tokenizers saved before they existed still load, with
  :meth:`Tokenizer.fim_ids` returning ``None`` (see :mod:`nanochat.data.fim`).
- :meth:`Tokenizer.encode` treats special-token *text* in its input as ordinary text (a source file that
  contains the string ``"<|end|>"`` cannot inject a control token); special ids are only ever inserted
  by code (:meth:`Tokenizer.render_chat`, the shard builder). ``encode(..., allow_special=True)`` parses
  them. The two behaviours use two ``tokenizers.Tokenizer`` instances, so nothing toggles shared state
  and concurrent encodes are safe.
- Every non-special token is a string of byte symbols, one character per byte, so the UTF-8 byte length
  of a token is the length of its string: :meth:`Tokenizer.token_bytes` is exact, which bits-per-byte needs.
- ``save`` writes ``tokenizer.json`` atomically (temp file + rename).
- **Base-model tokenizers.** A tokenizer from someone else's GGUF file (GPT-2 style, ``<|endoftext|>`` as BOS and
  EOS) has none of our chat tokens. Built with explicit ``bos_id``/``eos_id`` (the file's
  ``tokenizer.ggml.*_token_id`` keys), it encodes, decodes and completes; :meth:`Tokenizer.render_chat` then uses
  the file's ``tokenizer.chat_template`` (rendered with jinja2 in a sandbox, as HF transformers does) or raises
  :class:`ChatTemplateError`, a ``ValueError``, so a server answers 400. ``add_bos`` (the file's
  ``tokenizer.ggml.add_bos_token``) says whether a prompt starts with BOS (:meth:`Tokenizer.encode_prompt`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# every tokenizer has these (a tokenizer.json without one of them is refused)
REQUIRED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",  # document separator: one before every document
    "<|eos|>",  # end of text; in FIM training also the end of the middle
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",  # end of a chat message
)
# fill-in-the-middle sentinels (StarCoder's names); optional, so tokenizers trained before FIM still load
FIM_TOKENS: tuple[str, ...] = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
# what Tokenizer.train puts first in the vocabulary, in this order
SPECIAL_TOKENS: tuple[str, ...] = REQUIRED_SPECIAL_TOKENS + FIM_TOKENS
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
# the smallest vocabulary that holds the special tokens and the 256 byte symbols
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a data file is readable by all
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ChatTemplateError(ValueError):
    """The tokenizer cannot render a chat: no chat tokens and no usable chat template (a client error, HTTP 400)."""


class Tokenizer:
    """Byte-level BPE with nanochat's special tokens and chat template, or a base model's BOS/EOS (see above)."""

    def __init__(
        self,
        raw: HFTokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        eot_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """``raw`` with nanochat's special tokens, or, for a base model without them, explicit ``bos_id`` and
        ``eos_id`` (``eot_id``: end of turn, ``pad_id``: padding, both optional). Explicit ids win over the
        tokens found by name: they are what a GGUF file's ``tokenizer.ggml.*_token_id`` keys say."""
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if raw.token_to_id(t) is None]
        if missing and (bos_id is None or eos_id is None):
            raise ValueError(f"tokenizer lacks special tokens {missing} (and no BOS/EOS ids were given)")
        present_fim = [t for t in FIM_TOKENS if raw.token_to_id(t) is not None]
        if present_fim and len(present_fim) != len(FIM_TOKENS):
            raise ValueError(f"tokenizer has the FIM tokens {present_fim} but not all of {list(FIM_TOKENS)}")
        n = int(raw.get_vocab_size(with_added_tokens=True))
        for what, i in (("bos_id", bos_id), ("eos_id", eos_id), ("eot_id", eot_id), ("pad_id", pad_id)):
            if i is not None and (isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n):
                raise ValueError(f"{what} = {i!r} is not a token id of this {n}-token vocabulary")
        # `raw` parses special-token text (what exporters and llama.cpp see); a plain encode sets its
        # encode_special_tokens flag (not serialised) for the one call, under a lock. A second tokenizer for it cost
        # a to_str + from_str, ~40 ms of every model load.
        self.raw: HFTokenizer = raw
        self._encode_lock = threading.Lock()
        self.has_chat_tokens = not missing
        if self.has_chat_tokens:
            self.special_ids: dict[str, int] = {
                t: int(i) for t in SPECIAL_TOKENS if (i := raw.token_to_id(t)) is not None
            }
        else:  # a base model: its own control tokens (e.g. <|endoftext|>), so decoding skips them
            self.special_ids = {t.content: int(i) for i, t in raw.get_added_tokens_decoder().items() if t.special}
        self._bos = bos_id if bos_id is not None else self.special_ids["<|bos|>"]
        self._eos = eos_id if eos_id is not None else self.special_ids["<|eos|>"]
        self._eot = eot_id
        self._pad = pad_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self._template: Any = None  # the compiled jinja2 template, on first use
        self._token_bytes: np.ndarray | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE of ``vocab_size`` tokens (specials and 256 bytes included) on ``texts``."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be >= {MIN_VOCAB_SIZE} (specials + 256 bytes), got {vocab_size}")
        raw = HFTokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        raw.train_from_iterator(texts, trainer=trainer)
        return cls(raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a ``tokenizer.json`` file, or a directory containing one."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls(HFTokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` (``path`` is the file, or a directory to put it in); returns the file path."""
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        atomic_write_text(path, self.to_json())
        return path

    def to_json(self) -> str:
        return self.raw.to_str()

    @property
    def hash(self) -> str:
        """sha256 of the serialised tokenizer: identifies it in shard indexes and checkpoints."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    # ----------------------------------------------------------------- ids
    @property
    def vocab_size(self) -> int:
        return int(self.raw.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        """Padding: the explicit id, ``<|pad|>``, or (a base model without one) EOS."""
        if self._pad is not None:
            return self._pad
        return self.special_ids.get("<|pad|>", self._eos)

    @property
    def end_id(self) -> int:
        """End of a chat message: ``<|end|>``, or a base model's end-of-turn id (its EOS when it has none)."""
        if self.has_chat_tokens:
            return self.special_ids["<|end|>"]
        return self._eot if self._eot is not None else self._eos

    @property
    def eot_id(self) -> int | None:
        """End of turn as written to GGUF's ``tokenizer.ggml.eot_token_id``: ``<|end|>``, or the base model's."""
        return self.special_ids["<|end|>"] if self.has_chat_tokens else self._eot

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every id that ends a generation by default: EOS and the end of turn (llama.cpp's ``special_eog_ids``)."""
        return frozenset(i for i in (self._eos, self.eot_id) if i is not None)

    def fim_ids(self) -> tuple[int, int, int] | None:
        """``(prefix, suffix, middle)`` sentinel ids, or ``None`` for a tokenizer trained before FIM support."""
        if FIM_TOKENS[0] not in self.special_ids:
            return None
        pre, suf, mid = (self.special_ids[t] for t in FIM_TOKENS)
        return pre, suf, mid

    def role_id(self, role: str) -> int:
        if role not in CHAT_ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {CHAT_ROLES}")
        if not self.has_chat_tokens:
            raise ChatTemplateError(f"this tokenizer has no chat role tokens (no <|{role}|>): a base model")
        return self.special_ids[f"<|{role}|>"]

    def id_to_token(self, i: int) -> str | None:
        return self.raw.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.raw.token_to_id(token)

    # ----------------------------------------------------------------- encode / decode
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_encode_lock"}  # a lock does not pickle

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _encode_lock=threading.Lock())

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text is plain text unless ``allow_special``."""
        with self._encode_lock:
            self.raw.encode_special_tokens = not allow_special
            try:
                return self.raw.encode(text, add_special_tokens=False).ids
            finally:
                self.raw.encode_special_tokens = False

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a prompt to complete: ``[bos] + encode(text)`` when the model's files ask for BOS (``add_bos``,
        GGUF's ``tokenizer.ggml.add_bos_token``), else ``encode(text)`` — what ``llama-tokenize`` gives."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """:meth:`encode` over many texts, in parallel in the Rust library."""
        with self._encode_lock:
            self.raw.encode_special_tokens = not allow_special
            try:
                return [e.ids for e in self.raw.encode_batch(list(texts), add_special_tokens=False)]
            finally:
                self.raw.encode_special_tokens = False

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        return self.raw.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_bytes(self) -> np.ndarray:
        """``int32[vocab_size]``: UTF-8 bytes each token decodes to (0 for special tokens)."""
        if self._token_bytes is None:
            table = np.zeros(self.vocab_size, dtype=np.int32)
            specials = set(self.special_ids.values())
            for i in range(self.vocab_size):
                tok = self.raw.id_to_token(i)
                if tok is not None and i not in specials:
                    table[i] = len(tok)  # byte-level symbols: one character per byte
            self._token_bytes = table
        return self._token_bytes

    # ----------------------------------------------------------------- chat
    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Chat template: ``<|bos|>`` then per message ``<|role|> content <|end|>``, then ``<|assistant|>``.

        With ``add_generation_prompt`` (the default) the ids end with ``<|assistant|>``, ready for generation;
        the model's reply ends when it emits ``<|end|>``. A base-model tokenizer renders its ``chat_template``
        instead, or raises :class:`ChatTemplateError` when it has none.
        """
        if not self.has_chat_tokens:
            return self._render_template(messages, add_generation_prompt)
        ids, _ = self.render_conversation(messages)
        if add_generation_prompt:
            ids.append(self.role_id("assistant"))
        return ids

    def _render_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> list[int]:
        """The file's jinja2 chat template, sandboxed like HF transformers' ``apply_chat_template``; the text is
        tokenized with special tokens parsed (as llama.cpp tokenizes a templated prompt), with no BOS added."""
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat tokens and no chat template (tokenizer.chat_template): it is a base model; "
                "use completions instead of chat"
            )
        if self._template is None:
            try:
                from jinja2 import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:  # pragma: no cover - jinja2 comes with torch
                raise ChatTemplateError(
                    "rendering the model's chat template needs jinja2, which is not installed"
                ) from None

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None
        from jinja2 import TemplateError

        try:
            text = self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.id_to_token(self.bos_id) or "",
                eos_token=self.id_to_token(self.eos_id) or "",
            )
        except TemplateError as e:
            raise ChatTemplateError(f"the model's chat template refused the messages: {e}") from None
        return self.encode(text, allow_special=True)

    def render_conversation(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        """Ids of a whole conversation and a 0/1 mask marking the tokens an SFT loss trains on.

        The mask is 1 on assistant content and its closing ``<|end|>``, 0 elsewhere. Needs nanochat's chat tokens.
        """
        if not self.has_chat_tokens:
            raise ChatTemplateError("this tokenizer has no chat tokens (a base model): conversations cannot be built")
        ids = [self.bos_id]
        mask = [0]
        for m in messages:
            role, content = m["role"], m["content"]
            body = self.encode(content) + [self.end_id]
            ids.append(self.role_id(role))
            mask.append(0)
            ids.extend(body)
            mask.extend([1 if role == "assistant" else 0] * len(body))
        return ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]})"
