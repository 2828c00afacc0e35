"""GGUF export and memory-mapped loading.

Export writes ternary BitLinear weights as TQ2_0 (or TQ1_0) tensors whose blocks all carry the per-tensor scale
``d = fp16(s)``, the token embedding in f16, norms and mHC parameters in f32, the model hyperparameters as
``<arch>.*`` keys and the byte-level BPE tokenizer as ``tokenizer.ggml.*`` (``model = "gpt2"``,
``pre = "gpt-2"``: llama.cpp's GPT-2 pre-tokenizer reproduces ours token for token). ``standard`` models are written
as llama.cpp's ``bitnet`` architecture (and refused when they use something that graph cannot run); mHC models as
``nanochat``. No q/k permutation is applied: our RoPE already rotates the NEOX pairs ``(i, i+hd/2)`` that
llama.cpp's ``bitnet`` graph uses (``LLAMA_ROPE_TYPE_NEOX``), and its converter permutes nothing for ``bitnet``.

Loading uses :class:`nanochat.export.gguf_file.GGUFFile` (one read-only mmap, header parsed with ``struct``; gguf's
own reader needs ~1 s for a 16k-token vocabulary): TQ2_0 tensors go to the kernel layout with one
block-strip copy (``_core.tq2_0_to_kernel_layout`` via ops), never through a dequantized float copy. Files written
by llama.cpp's converter for ``bitnet`` load too: TQ1_0 or TQ2_0, the scale in the blocks or in an optional
``blk.N.<name>.scale`` tensor. Every problem (wrong magic, truncation, unknown architecture, missing or misshapen
tensors) raises :class:`GGUFError` naming it.

Files other people make (issue 15; ``tests/test_gguf_thirdparty.py``): a tokenizer without our chat tokens is a base
model whose BOS/EOS/EOT/padding come from ``tokenizer.ggml.*_token_id`` (plus ``add_bos_token`` and
``tokenizer.chat_template``); embeddings and heads in any type gguf-py dequantizes (``llama-quantize``'s Q6_K, Q4_K,
Q8_0, BF16) become f32; float BitLinear weights are packed for the ternary kernels at load (exactly when they hold
``trits · s``, as the converter writes them; with the absmean rule and a warning otherwise). Exports write
``eot_token_id`` and ``add_bos_token`` the way llama.cpp reads them (``gguf.Keys.Tokenizer``).

Header numbers are not trusted: ``block_count`` must match the blocks present in the tensor directory before any
per-layer work (a patched ``1048576`` used to cost minutes and gigabytes), hyperparameters must be integers, and the
tokenizer arrays are checked against each other (``token_type`` as long as ``tokens``, unique tokens, NORMAL tokens
drawn from the byte-level alphabet, every merge made of tokens in the vocabulary) so that a flipped byte names the
key instead of surfacing as the tokenizers library's ``Error while initializing BPE``.

Silent garbage (issue 14 item 12) is refused for every file: TQ2_0 code 3 (not a trit), block scales that are not
finite, negative, or zero under non-zero trits, ``.scale`` tensors that are not positive, ternary data in a
``quant = fp`` model. Our own files (they carry ``nanochat.checksum.sha256``, or are architecture ``nanochat``, which
only we write) are held to what the exporter writes: every tensor's type (TQ2_0/TQ1_0 BitLinear weights, F16
embedding and head, F32 for the rest), and the checksum over metadata and tensors (a flipped byte anywhere but the
padding is an error). Third-party files carry no checksum and keep the types llama.cpp's tools write.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanochat import ops
from nanochat.data.tokenizer import Tokenizer
from nanochat.export.gguf_file import GGUFFile, LoadError
from nanochat.export.names import (
    ARCH_BITNET,
    ARCH_NANOCHAT,
    CHECKSUM_ALGOS,
    CHECKSUM_HEX_LEN,
    CHECKSUM_KEY,
    TOKENIZER_JSON_KEY,
    from_gguf_name,
)
from nanochat.model.config import GPTConfig
from nanochat.model.schema import (
    BITNET_FIXED,
    HPARAMS,
    NANOCHAT_HPARAMS,
    HParam,
    TensorSpec,
    expected_shapes,
    layer_count_problem,
    state_dict_problem,
    tensor_specs,
)

if TYPE_CHECKING:
    import torch

    from nanochat.model import GPT

# their home is nanochat.model.schema; callers (safetensors_io, train.checkpoint, tests) import them from here too
REEXPORTED = (expected_shapes, layer_count_problem, state_dict_problem)
_log = logging.getLogger("nanochat.export")
QK_K = 256  # weights per TQ2_0/TQ1_0 block: a ternary row is whole blocks
TQ2_0_BLOCK_BYTES, TQ1_0_BLOCK_BYTES = 66, 54  # qs[64] then fp16 d; qs[48] qh[4] then fp16 d
# keys left out of the GGUF checksum: the checksum itself (either key), and the alignment, which only moves bytes around
CHECKSUM_EXCLUDED = (*CHECKSUM_ALGOS, "general.alignment")
MIN_WEIGHT_SCALE = 1e-5  # absmean's floor, as in nanochat.ops.ternary


class GGUFError(LoadError):
    """A GGUF file we cannot use, with the reason."""


# ----------------------------------------------------------------------------- export


def check_bitnet_compatible(cfg: GPTConfig) -> None:
    """Refuse, with the reason, a standard-residual model llama.cpp's ``bitnet`` graph would run wrong."""
    problems = []
    if cfg.qk_norm:
        problems.append("qk_norm=true (the bitnet graph has no QK-norm)")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp!r} (the bitnet graph runs SwiGLU only)")
    if not cfg.tie_embeddings:
        problems.append("an untied LM head (llama.cpp refuses an output tensor for bitnet)")
    if cfg.quant != "ternary":
        problems.append("quant='fp' (bitnet files hold ternary weights)")
    if problems:
        raise GGUFError(
            "this model cannot be written as llama.cpp's 'bitnet' architecture: "
            + "; ".join(problems)
            + ". Train with residual='standard', mlp='swiglu', qk_norm=false, tie_embeddings=true, or export "
            "with --arch nanochat (runs on nanochat's engine only)."
        )


def _tokenizer_fields(tok: Tokenizer) -> dict[str, Any]:
    spec = json.loads(tok.to_json())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFError(f"only byte-level BPE tokenizers can be exported, got {model.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(specials)
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = 3 if t in specials else 1  # CONTROL / NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def write_hparams(w: Any, cfg: GPTConfig) -> None:
    """The ``<arch>.*`` hyperparameter keys llama.cpp's ``bitnet`` loader reads (and ours), from the schema's table
    (:data:`nanochat.model.schema.HPARAMS`), plus ``rope.dimension_count`` (derived: the head size)."""
    for hp in HPARAMS:
        _write_hparam(w, hp, getattr(cfg, hp.field))
        if hp.field == "rope_theta":
            w.add_rope_dimension_count(cfg.head_dim)


def _write_hparam(w: Any, hp: HParam, value: Any) -> None:
    key = f"{w.arch}.{hp.key}"
    {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "bool": w.add_bool}[hp.kind](key, value)


# tokenizer.ggml.fim_{pre,suf,mid}_token_id: gguf.Keys.Tokenizer.FIM_PRE_ID/FIM_SUF_ID/FIM_MID_ID, the keys
# llama.cpp's vocabulary loader reads for /infill (spelled out so the loader need not import gguf)
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")


def write_tokenizer(w: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """``tokenizer.ggml.*``: GPT-2 byte-level BPE; embedding rows beyond the tokenizer become unused tokens."""
    tf = _tokenizer_fields(tokenizer)
    pad = vocab_size - len(tf["tokens"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tf["tokens"] + [f"[PAD{i}]" for i in range(len(tf["tokens"]), vocab_size)])
    w.add_token_types(tf["types"] + [5] * pad)
    w.add_token_merges(tf["merges"])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.eot_id is not None:  # end of turn: llama.cpp stops at EOS, EOT and EOM (its special_eog_ids)
        w.add_eot_token_id(tokenizer.eot_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(tokenizer.add_bos)  # what our prompts do, so llama-tokenize gives the same ids
    w.add_add_eos_token(False)
    fim = tokenizer.fim_ids()
    if fim is not None:  # what llama.cpp's /infill needs (its PSM prompt is the layout we train)
        for key, i in zip(FIM_KEYS, fim, strict=True):
            w.add_uint32(key, i)


def export_gguf(
    model: GPT,
    tokenizer: Tokenizer,
    out: str | os.PathLike[str],
    quant: str = "tq2_0",
    arch: str | None = None,
    name: str = "nanochat",
) -> Path:
    """Write ``model`` (+ tokenizer) as a GGUF file; atomic (temp file then rename). Returns the path."""
    import gguf
    import torch

    cfg = model.config
    if arch is None:
        arch = ARCH_BITNET if cfg.residual == "standard" else ARCH_NANOCHAT
    if arch == ARCH_BITNET:
        if cfg.residual != "standard":
            raise GGUFError(f"residual={cfg.residual!r} cannot be written as 'bitnet'; use arch 'nanochat'")
        check_bitnet_compatible(cfg)
    elif arch != ARCH_NANOCHAT:
        raise GGUFError(f"unknown architecture {arch!r} (bitnet or nanochat)")
    qtypes = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
    if quant not in qtypes:
        raise GGUFError(f"unknown quantization {quant!r} (tq2_0 or tq1_0)")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GGUFError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name)
        write_hparams(w, cfg)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if quant == "tq2_0" else gguf.LlamaFileType.MOSTLY_TQ1_0)
        if arch == ARCH_NANOCHAT:
            for hp in NANOCHAT_HPARAMS:
                _write_hparam(w, hp, getattr(cfg, hp.field))
        write_tokenizer(w, tokenizer, cfg.vocab_size)
        template = CHAT_TEMPLATE if tokenizer.has_chat_tokens else tokenizer.chat_template
        if template:
            w.add_chat_template(template)
        w.add_string(TOKENIZER_JSON_KEY, _cached_tokenizer_json(tokenizer))  # what our loader builds it from
        # a placeholder of the digest's length, filled in by seal_gguf
        w.add_string(CHECKSUM_KEY, "0" * CHECKSUM_HEX_LEN[CHECKSUM_ALGOS[CHECKSUM_KEY]])

        specs = {s.name: s for s in tensor_specs(cfg)}
        for pname, t in model.state_dict().items():
            spec = specs[pname]  # the schema's row: GGUF name, BitLinear or not, float type
            t = t.detach().float().cpu()
            if spec.ternary and cfg.quant == "ternary":
                trits, scale = ops.absmean_quantize(t)
                data = ops.pack_gguf(trits.to(torch.int8).numpy(), float(scale), quant)
                w.add_tensor(spec.gguf_name, data, raw_shape=data.shape, raw_dtype=qtypes[quant])
            else:
                w.add_tensor(spec.gguf_name, t.numpy().astype(np.float16 if spec.f16 else np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        seal_gguf(tmp)
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def _cached_tokenizer_json(tok: Tokenizer) -> str:
    """``tokenizer.json`` with the merges as ``"a b"`` strings (the format HF tokenizers still reads) instead of
    ``["a", "b"]`` pairs: a quarter less parsing at load (~26 vs ~35 ms for 16k merges). Byte-level BPE tokens hold no
    space (it is spelled ``Ġ``); a tokenizer whose merges do keeps the pairs."""
    spec = json.loads(tok.to_json())
    merges = spec.get("model", {}).get("merges")
    if merges and all(isinstance(m, list) and len(m) == 2 and " " not in m[0] + m[1] for m in merges):
        spec["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))


def seal_gguf(path: str | os.PathLike[str]) -> str:
    """Write the content checksum into a GGUF file's checksum key, in place; returns it. The key must be present
    with a value of the digest's length: ``nanochat.checksum.xxh3_128`` (32 characters, what exports write) or, in
    an older file, ``nanochat.checksum.sha256`` (64). The digest leaves out the key itself, so writing it changes
    nothing it covers."""
    reader = GGUFFile(Path(path))
    key = next((k for k in CHECKSUM_ALGOS if k in reader.fields), CHECKSUM_KEY)
    n = CHECKSUM_HEX_LEN[CHECKSUM_ALGOS[key]]
    old = reader.fields.get(key)
    if not isinstance(old, str) or len(old.encode()) != n:
        raise GGUFError(f"{path}: no {n}-character {key} to fill in")
    digest = reader.content_digest(CHECKSUM_EXCLUDED, CHECKSUM_ALGOS[key])
    end = reader.kv_spans[key][1]  # the record ends with the digest's bytes
    del reader  # its mmap, before writing through another handle
    with open(path, "r+b") as f:
        f.seek(end - n)
        f.write(digest.encode())
    return digest


# A ChatML-like template with the tokenizer's role tokens, for other runtimes: renders exactly what
# ``Tokenizer.render_chat`` builds (a test holds them equal), BOS included, since we write ``add_bos_token = false``.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# ----------------------------------------------------------------------------- load


@dataclass
class GGUFModel:
    """What a GGUF file holds, in the model's terms; arrays are views of the memory-mapped file where possible.

    ``ternary`` holds the one derived copy (the kernel layout, made at load so that a bad file fails there).
    :meth:`release` drops it and the file's pages once the Rust engine holds its own copy, so that a served model
    is resident once, not three times (issue 13); both come back from the file if asked for again.
    """

    path: Path
    arch: str
    config: GPTConfig
    tokenizer: Tokenizer
    _ternary: dict[str, tuple[np.ndarray, float]] | None  # the kernel layout, until released
    dense: dict[str, np.ndarray]  # state-dict name -> float array (f16/f32 views of the file)
    _reader: GGUFFile | None = field(default=None, repr=False)
    _sources: dict[str, tuple[np.ndarray, int, float | None]] = field(default_factory=dict, repr=False)

    @property
    def ternary(self) -> dict[str, tuple[np.ndarray, float]]:
        """State-dict name -> (packed uint8 rows×cols/4 in the kernel layout, scale)."""
        if self._ternary is None:  # released: repack from the file's blocks (checked at load)
            self._ternary = {name: _repack(data, ttype, mult) for name, (data, ttype, mult) in self._sources.items()}
        return self._ternary

    def release(self) -> None:
        """Drop the packed copy and the file's resident pages (for after the Rust engine copied the weights)."""
        if self._sources:  # only a copy that can be rebuilt is dropped
            self._ternary = None
            _trim_heap()
        if self._reader is not None:
            self._reader.drop_pages()


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``): the packed arrays just dropped, and the
    engine's intermediate copies, are mid-sized blocks that glibc otherwise keeps mapped (~26 MB of RSS for
    nano_125m). A no-op where the C library has no ``malloc_trim``."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _repack(data: np.ndarray, ttype: int, extra: float | None) -> tuple[np.ndarray, float]:
    """TQ2_0/TQ1_0 blocks (``rows × bytes``) -> (kernel layout, scale), the scale times an optional ``.scale``
    tensor's ``extra`` (which stands alone when every block's ``d`` is 0)."""
    from gguf.constants import GGMLQuantizationType as T

    packed, scale = (ops.tq2_0_to_kernel_layout if ttype == T.TQ2_0 else ops.tq1_0_to_kernel_layout)(data)
    if extra is not None:
        scale = scale * extra if scale > 0 else extra
    return packed, scale


def _field(reader: Any, key: str, required: bool = True) -> Any:
    if key not in reader.fields:
        if required:
            raise GGUFError(f"{reader.path}: required key {key!r} is missing")
        return None
    return reader.fields[key]


def _string_list(reader: Any, key: str, required: bool = True) -> list[str] | None:
    val = _field(reader, key, required)
    if val is not None and (not isinstance(val, list) or not all(isinstance(v, str) for v in val)):
        raise GGUFError(f"{reader.path}: {key} must be an array of strings")
    return val


def _check_tokenizer_arrays(path: Path, tokens: list[str], types: list[int], merges: list[str]) -> dict[str, int]:
    """The BPE vocabulary ``{token: id}`` once the arrays agree; GGUFError naming the key and entry otherwise."""
    if len(types) != len(tokens):
        raise GGUFError(
            f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens has {len(tokens)}"
        )
    from tokenizers import pre_tokenizers

    alphabet = frozenset(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters GPT-2's byte-level BPE spells in
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types, strict=True)):
        if isinstance(ty, bool) or not isinstance(ty, int) or not 1 <= ty <= 6:
            raise GGUFError(f"{path}: tokenizer.ggml.token_type[{i}] = {ty!r} is not a token type (1..6)")
        if ty == 5:  # UNUSED: padding rows, not part of the vocabulary
            continue
        if t in vocab:
            raise GGUFError(f"{path}: tokenizer.ggml.tokens[{i}] = {t!r} repeats token {vocab[t]}")
        if ty == 1 and (not t or not alphabet.issuperset(t)):
            raise GGUFError(f"{path}: tokenizer.ggml.tokens[{i}] = {t!r} is not a byte-level BPE token")
        vocab[t] = i
    if not merges and any(len(t) > 1 for t, i in vocab.items() if types[i] == 1):
        raise GGUFError(f"{path}: tokenizer.ggml.merges is missing, but the vocabulary has multi-byte BPE tokens")
    for i, m in enumerate(merges):
        a, sep, b = m.partition(" ")
        if not sep or not a or not b or a not in vocab or b not in vocab or a + b not in vocab:
            raise GGUFError(
                f"{path}: tokenizer.ggml.merges[{i}] = {m!r} does not merge two tokens of the vocabulary into a third"
            )
    return vocab


def _token_id(reader: Any, key: str, n_tokens: int) -> int | None:
    """An optional ``tokenizer.ggml.*_token_id``, checked to name a token of the vocabulary."""
    v = _field(reader, key, required=False)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_tokens):
        raise GGUFError(f"{reader.path}: {key} = {v!r} is not a token id (the vocabulary has {n_tokens})"[:300])
    return v


# tokenizer.ggml.pre values whose pre-tokenizer is GPT-2's regex (what our Tokenizer splits with); llama.cpp's
# converter names the pre-tokenizer by hashing the HF tokenizer's output, and other names split text differently
GPT2_PRE_TOKENIZERS = ("gpt-2", "gpt2")


def _tokenizer_from_arrays(reader: Any, tokens: list[str]) -> Any:
    """The HF tokenizer rebuilt from the ``tokenizer.ggml.*`` arrays (llama.cpp's converter layout), every entry
    checked: what third-party files (and ours without a verified checksum) load through."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFError(f"{reader.path}: tokenizer.ggml.model {model!r} is not supported (byte-level BPE 'gpt2' only)")
    pre = _field(reader, "tokenizer.ggml.pre", required=False)
    if pre is not None and pre not in GPT2_PRE_TOKENIZERS:
        raise GGUFError(
            f"{reader.path}: tokenizer.ggml.pre {pre!r} is not supported (only GPT-2's pre-tokenizer, 'gpt-2'): "
            "its text would split differently"[:300]
        )
    types = _field(reader, "tokenizer.ggml.token_type", required=False)
    if types is None:
        types = [1] * len(tokens)
    elif not isinstance(types, list):
        raise GGUFError(f"{reader.path}: tokenizer.ggml.token_type must be an array of integers")
    merges_raw = _string_list(reader, "tokenizer.ggml.merges", required=False) or []
    vocab = _check_tokenizer_arrays(reader.path, tokens, types, merges_raw)
    merges = [(a, b) for a, _, b in (m.partition(" ") for m in merges_raw)]
    try:
        raw = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    except Exception as e:  # the library's bare Exception; the checks above should leave nothing for it
        raise GGUFError(f"{reader.path}: tokenizer.ggml.tokens/merges do not form a BPE model ({e})") from None
    gpt2_regex = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(gpt2_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    specials = [(i, t) for i, t in enumerate(tokens) if types[i] == 3]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in specials])
    for i, t in specials:
        if raw.token_to_id(t) != i:
            raise GGUFError(
                f"{reader.path}: special token {t!r} has id {i} in the file but {raw.token_to_id(t)} when rebuilt"
            )
    return raw


def _tokenizer_from_gguf(reader: Any, cached_json: str | None = None) -> Tokenizer:
    """The tokenizer: from ``cached_json`` (our exports' ``nanochat.tokenizer.json``, passed only when the file's
    checksum holds: one parse) or rebuilt from the ``tokenizer.ggml.*`` arrays, each entry checked; the token ids
    (BOS, EOS, ...), ``add_bos_token``, chat template and FIM keys come from the keys either way."""
    from tokenizers import Tokenizer as HFTokenizer

    if cached_json is not None:
        n_tokens = reader.fields.array_len("tokenizer.ggml.tokens") or 0  # the arrays stay undecoded
        try:
            raw = HFTokenizer.from_str(cached_json)
        except Exception as e:  # the library's bare Exception
            raise GGUFError(f"{reader.path}: {TOKENIZER_JSON_KEY} is not a valid tokenizer ({e})") from None
    else:
        tokens = _string_list(reader, "tokenizer.ggml.tokens") or []
        n_tokens = len(tokens)
        raw = _tokenizer_from_arrays(reader, tokens)
    ids = {k: _token_id(reader, f"tokenizer.ggml.{k}_token_id", n_tokens) for k in ("bos", "eos", "eot", "padding")}
    if ids["eos"] is None and raw.token_to_id("<|eos|>") is None:
        raise GGUFError(
            f"{reader.path}: the tokenizer has neither tokenizer.ggml.eos_token_id nor nanochat's special tokens, "
            "so generation would never stop"
        )
    if ids["bos"] is None and raw.token_to_id("<|bos|>") is None:
        ids["bos"] = ids["eos"]  # GPT-2: one <|endoftext|> separates documents both ways
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", required=False)
    if add_bos is not None and not isinstance(add_bos, bool):
        raise GGUFError(f"{reader.path}: tokenizer.ggml.add_bos_token must be a boolean, got {add_bos!r}"[:300])
    template = _field(reader, "tokenizer.chat_template", required=False)
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"{reader.path}: tokenizer.chat_template must be a string")
    try:
        tok = Tokenizer(
            raw,
            bos_id=ids["bos"],
            eos_id=ids["eos"],
            eot_id=ids["eot"],
            pad_id=ids["padding"],
            add_bos=bool(add_bos),
            chat_template=template,
        )
    except ValueError as e:
        raise GGUFError(f"{reader.path}: {e}") from None
    # FIM ids: we find the sentinels by name; the keys llama.cpp reads must name the same tokens
    keyed = [_field(reader, k, required=False) for k in FIM_KEYS]
    if any(k is not None for k in keyed):
        found = tok.fim_ids()
        if found is None or tuple(None if k is None else int(k) for k in keyed) != found:
            raise GGUFError(
                f"{reader.path}: FIM token ids {dict(zip(FIM_KEYS, keyed, strict=True))} do not match the "
                f"tokenizer's FIM tokens {found}"
            )
    return tok


def _config_from_gguf(reader: Any, arch: str) -> GPTConfig:
    """The config from the file's ``<arch>.*`` keys (the schema's tables), the header's numbers checked for type and,
    ``block_count`` first, against the tensors the file really holds."""

    def value(hp: HParam) -> Any:
        v = _field(reader, f"{arch}.{hp.key}", hp.required)
        if v is None:
            return None
        bad = {
            "u32": isinstance(v, bool) or not isinstance(v, int),
            "f32": isinstance(v, bool) or not isinstance(v, (int, float)),
            "str": not isinstance(v, str),
            "bool": not isinstance(v, bool),
        }[hp.kind]
        if bad:
            want = {"u32": "an integer", "f32": "a number", "str": "a string", "bool": "a boolean"}[hp.kind]
            raise GGUFError(f"{reader.path}: {arch}.{hp.key} must be {want}, got {v!r}"[:300])
        if hp.kind == "f32":  # float32 keys: shortest decimal that round-trips through f32 (1e-5, not 9.99999974e-06)
            return float(f"{v:.7g}")
        return v

    kw: dict[str, Any] = {}
    for hp in HPARAMS + (NANOCHAT_HPARAMS if arch == ARCH_NANOCHAT else ()):
        v = value(hp)
        if v is not None:
            kw[hp.field] = v
    problem = layer_count_problem(kw["n_layer"], (t.name for t in reader.tensors))
    if problem:  # before any other check of the numbers: it says the most about a patched header
        raise GGUFError(f"{reader.path}: {problem}")
    kw.setdefault("n_kv_head", kw["n_head"])
    if "vocab_size" not in kw:
        kw["vocab_size"] = len(_string_list(reader, "tokenizer.ggml.tokens") or [])
    if arch == ARCH_BITNET:
        # llama.cpp's bitnet graph always ties the head; a file with an explicit output.weight still runs here
        untied = any(t.name == "output.weight" for t in reader.tensors)
        kw.update(BITNET_FIXED, tie_embeddings=not untied)
    try:
        return GPTConfig(**kw)
    except ValueError as e:
        raise GGUFError(f"{reader.path}: hyperparameters in the file are inconsistent: {e}") from None


def _float_tensor(path: Path, name: str, ttype: Any, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A float view (F32/F16) or copy (BF16, and what ``llama-quantize`` writes: Q8_0, Q6_K, Q4_K, ...) of a
    tensor, dequantized with ``gguf.quants``; embeddings and heads arrive this way, as do norms in some files."""
    from gguf.constants import GGMLQuantizationType as T

    if ttype in (T.F32, T.F16):
        return np.asarray(data).reshape(shape)
    if ttype == T.BF16:
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    from gguf.quants import dequantize

    try:
        out = dequantize(np.asarray(data, dtype=np.uint8).reshape(shape[0], -1), ttype)
    except NotImplementedError:
        raise GGUFError(f"{path}: tensor {name!r} has type {ttype.name}, which cannot be dequantized here") from None
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _ternarize(path: Path, name: str, w: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """A float BitLinear weight as ``(kernel-layout packed, scale, exact)``, so the Rust engine runs float files.

    llama.cpp's converter writes BitNet weights already quantized, ``trits · s`` in f16/f32: every non-zero has the
    same magnitude ``s``, taken exactly (``exact``; the absmean of such a tensor is ``s`` times the fraction of
    non-zeros, not ``s``). Anything else (latent float weights) gets BitNet b1.58's absmean rule, what ``BitLinear``
    computes with them; a runtime doing float matmuls on the same file computes something else (the caller warns).
    """
    w32 = np.asarray(w, dtype=np.float32)
    if w32.shape[-1] % QK_K:
        raise GGUFError(
            f"{path}: tensor {name!r} has {w32.shape[-1]} columns; ternary kernels need a multiple of {QK_K}"
        )
    if not np.isfinite(w32).all():
        raise GGUFError(f"{path}: tensor {name!r} holds non-finite values")
    mags = np.abs(w32[w32 != 0])
    exact = bool(mags.size) and mags.min() == mags.max()
    if exact:
        scale = float(mags[0])
        trits = np.sign(w32)
    else:  # ops.absmean_quantize in numpy (round half to even, like torch.round), so no torch import here
        scale = max(float(np.abs(w32).mean(dtype=np.float32)), MIN_WEIGHT_SCALE)
        trits = np.clip(np.round(w32 / np.float32(scale)), -1, 1)
    # to the kernel layout through TQ2_0 bytes (the numpy-only helpers); the block d (fp16) is not used
    packed, _ = ops.tq2_0_to_kernel_layout(ops.pack_gguf(trits.astype(np.int8), 1.0, "tq2_0"))
    return packed, scale, exact


def _check_tq2_0(path: Path, name: str, data: np.ndarray) -> None:
    """Refuse TQ2_0 bytes no writer produces: code 3 (codes are trit + 1 in {0, 1, 2}), and block scales ``d`` that
    are not finite, negative, or zero in a block with non-zero trits (gguf's quantizer writes ``d = 0`` only for
    all-zero blocks). Vectorised over 8-byte words: four codes per byte, 32 per word."""
    blocks = data.reshape(-1, TQ2_0_BLOCK_BYTES)
    qs = blocks[:, :64].view("<u8")  # (n_blocks, 8)
    ones = np.uint64(0x5555_5555_5555_5555)  # the low bit of every 2-bit code; all codes 1 = all trits 0
    code3 = qs >> np.uint64(1)  # one temporary, then in place: ~15 ms for nano_125m's 28 MiB
    code3 &= qs
    code3 &= ones
    if code3.any():
        b = int(np.flatnonzero(code3.any(axis=1))[0])
        raise GGUFError(f"{path}: tensor {name!r} block {b} holds code 3, which is not a trit (TQ2_0 codes are 0..2)")
    d = blocks[:, 64:66].view("<f2")[:, 0]
    _check_block_scales(path, name, d)
    zero = np.flatnonzero(d == 0)  # usually none: only then look at those blocks' codes
    if zero.size:
        bad = zero[(qs[zero] != ones).any(axis=1)]
        if bad.size:
            raise GGUFError(f"{path}: tensor {name!r} block {int(bad[0])} has non-zero trits but scale 0")


def _check_block_scales(path: Path, name: str, d: np.ndarray) -> None:
    """Block scales ``d`` (one per block) must be finite and >= 0 (gguf's quantizers write ``max |x|``)."""
    bad = ~np.isfinite(d) | (d < 0)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        raise GGUFError(f"{path}: tensor {name!r} block {b} has scale {float(d[b])}: block scales must be finite, >= 0")


def _ours_expected_type(spec: TensorSpec, cfg: GPTConfig) -> tuple[Any, ...]:
    """The tensor types :func:`export_gguf` writes for the schema's tensor ``spec``."""
    from gguf.constants import GGMLQuantizationType as T

    if spec.ternary and cfg.quant == "ternary":
        return (T.TQ2_0, T.TQ1_0)
    return (T.F16,) if spec.f16 else (T.F32,)


def read_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Open a GGUF file (memory-mapped) and map it onto our model; raises GGUFError naming the file on any
    problem."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()  # a load allocates many containers and frees few: ~13 collections (~2 ms) for nothing to collect
    try:
        return _read_gguf(Path(path))
    except GGUFError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise GGUFError(f"{path}: {e}") from None
    finally:
        if was_enabled:
            gc.enable()


def _read_gguf(path: Path) -> GGUFModel:
    from gguf.constants import GGMLQuantizationType as T

    from nanochat.export.gguf_file import GGUFFormatError, check_regular_file, open_regular

    path = Path(path)
    if not path.exists():
        raise GGUFError(f"{path}: no such file")
    try:
        check_regular_file(path)
    except LoadError as e:
        raise GGUFError(str(e)) from None
    with os.fdopen(open_regular(path), "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFFile(path)
    except GGUFFormatError as e:
        raise GGUFError(f"{path}: corrupt or truncated GGUF ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch not in (ARCH_BITNET, ARCH_NANOCHAT):
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (bitnet or nanochat)")
    cfg = _config_from_gguf(reader, arch)  # block_count checked against the tensors first
    # The checksum first (XXH3: ~5 ms for nano_125m's 53 MB; an older file's SHA-256 ~45 ms), so that a verified file
    # can be trusted for its cached tokenizer. A mismatch is raised last: the checks below name what is wrong, the
    # checksum says only that something is.
    checksum_key = next((k for k in CHECKSUM_ALGOS if k in reader.fields), None)
    stored_digest = reader.fields.get(checksum_key) if checksum_key else None
    digest = reader.content_digest(CHECKSUM_EXCLUDED, CHECKSUM_ALGOS[checksum_key]) if checksum_key else None
    verified = digest is not None and digest == stored_digest
    ours = checksum_key is not None or arch == ARCH_NANOCHAT  # only nanochat writes either
    cached_tok = reader.fields.get(TOKENIZER_JSON_KEY) if verified else None
    tok = _tokenizer_from_gguf(reader, cached_tok if isinstance(cached_tok, str) else None)
    specs = {s.gguf_name: s for s in tensor_specs(cfg)}  # the schema: what this config's file holds
    ternary: dict[str, tuple[np.ndarray, float]] = {}
    sources: dict[str, tuple[np.ndarray, int, float | None]] = {}  # TQ blocks in the file, to repack after release
    dense: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    names = {t.name for t in reader.tensors}
    dequantized: list[str] = []
    exact_float: list[str] = []  # float BitLinear weights already ternary-valued (the converter's f16/f32 output)
    latent_float: list[str] = []  # float BitLinear weights quantized here with the absmean rule
    for t in reader.tensors:
        ttype = T(t.type)
        if t.name.endswith(".scale"):
            if ours:
                raise GGUFError(f"{path}: unexpected tensor {t.name!r} (nanochat's exports keep scales in the blocks)")
            if ttype != T.F32 or np.asarray(t.data).size != 1:
                raise GGUFError(f"{path}: scale tensor {t.name!r} must hold one F32 value")
            s = float(np.asarray(t.data, dtype=np.float32).reshape(-1)[0])
            if not (np.isfinite(s) and s > 0):
                raise GGUFError(f"{path}: scale tensor {t.name!r} holds {s}; a weight scale must be finite and > 0")
            scales[t.name[: -len(".scale")] + ".weight"] = s
            continue
        spec = specs.get(t.name)
        if spec is None:
            try:
                from_gguf_name(t.name)
            except KeyError:
                raise GGUFError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}") from None
            raise GGUFError(f"{path}: tensor {t.name!r} does not belong to this configuration")
        name, want = spec.name, spec.shape
        got = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims fastest-first
        if got != want:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {got}, expected {want}")
        if ttype in (T.TQ2_0, T.TQ1_0) and cfg.quant != "ternary":
            raise GGUFError(
                f"{path}: the file declares quant = {cfg.quant!r} (float weights), but tensor {t.name!r} holds "
                f"ternary {ttype.name} data"
            )
        if ours and ttype not in (allowed := _ours_expected_type(spec, cfg)):
            raise GGUFError(
                f"{path}: tensor {t.name!r} has type {ttype.name}, but nanochat writes it as "
                f"{' or '.join(a.name for a in allowed)}: the file is corrupt or was modified"
            )
        if ttype in (T.TQ2_0, T.TQ1_0):
            if not spec.ternary:
                raise GGUFError(f"{path}: tensor {t.name!r} is ternary but should be a float tensor")
            data = np.asarray(t.data, dtype=np.uint8).reshape(want[0], -1)
            try:
                if ttype == T.TQ2_0:
                    _check_tq2_0(path, t.name, data)
                    packed, scale = ops.tq2_0_to_kernel_layout(data)
                else:
                    _check_block_scales(path, t.name, data.reshape(-1, TQ1_0_BLOCK_BYTES)[:, 52:54].view("<f2")[:, 0])
                    packed, scale = ops.tq1_0_to_kernel_layout(data)
            except (ValueError, TypeError) as e:  # the core's own refusals (blocks with different scales)
                if isinstance(e, GGUFError):
                    raise
                raise GGUFError(f"{path}: tensor {t.name!r}: {e}") from None
            if not (np.isfinite(scale) and scale > 0) and t.name[: -len(".weight")] + ".scale" not in names:
                raise GGUFError(f"{path}: tensor {t.name!r}: every block scale is zero, so the weight would be all 0")
            ternary[name] = (packed, scale)
            sources[name] = (data, ttype, None)
            continue
        arr = _float_tensor(path, t.name, ttype, t.data, want)
        if spec.ternary and cfg.quant == "ternary":
            packed, scale, exact = _ternarize(path, t.name, arr)
            ternary[name] = (packed, scale)
            (exact_float if exact else latent_float).append(t.name)
        else:
            dense[name] = arr
        if ttype not in (T.F32, T.F16, T.BF16):
            dequantized.append(f"{t.name} ({ttype.name})")
    if dequantized:
        _log.info("%s: dequantized to float32 at load: %s", path.name, ", ".join(dequantized))
    if exact_float:
        _log.info(
            "%s: %d float BitLinear weights hold ternary values (trits x scale): packed exactly for the ternary "
            "kernels",
            path.name,
            len(exact_float),
        )
    if latent_float:
        _log.warning(
            "%s: %d BitLinear weights are float, not ternary (%s...): quantized at load with BitNet b1.58's absmean "
            "rule, as BitLinear does; a runtime doing float matmuls with this file computes something else",
            path.name,
            len(latent_float),
            latent_float[0],
        )
    for wname, s in scales.items():
        try:
            name = from_gguf_name(wname)
        except KeyError:
            raise GGUFError(f"{path}: scale tensor for unknown tensor {wname!r}") from None
        if name in ternary:
            packed, scale = ternary[name]
            ternary[name] = (packed, scale * s if scale > 0 else s)
            if name in sources:
                sources[name] = (*sources[name][:2], s)
    missing = [g for g, spec in specs.items() if spec.name not in ternary and spec.name not in dense]
    if missing:
        raise GGUFError(f"{path}: missing tensor(s) {sorted(missing)}")
    if checksum_key is not None and not verified:  # last: the checks above name what is wrong
        raise GGUFError(
            f"{path}: checksum mismatch ({checksum_key} is {str(stored_digest)[:64]!r}, the content hashes to "
            f"{digest!r}): the file is corrupt or was modified after export"
        )
    # float BitLinear weights packed here (third-party files) are not in `sources`: their copy is kept
    return GGUFModel(path, arch, cfg, tok, ternary, dense, reader, sources if len(sources) == len(ternary) else {})


def latent_from_ternary(packed: np.ndarray, scale: float) -> torch.Tensor:
    """A float weight whose absmean quantization is exactly ``(trits, scale)``.

    ``W = trits · scale / p`` with ``p`` the fraction of non-zero trits: ``mean|W| = scale`` and
    ``clamp(round(W/scale), -1, 1) = trits`` (``|1/p| ≥ 1``), so a BitLinear holding ``W`` computes with the file's
    ternary weights and scale.
    """
    import torch

    trits = ops.unpack_ternary(torch.from_numpy(np.ascontiguousarray(packed)))
    p = float((trits != 0).float().mean())
    if p == 0.0:
        return torch.zeros_like(trits)
    return trits * (scale / p)


def gguf_to_torch(g: GGUFModel) -> GPT:
    """Materialise a torch GPT (float latent weights) from a loaded GGUF: the CUDA path and the test reference."""
    import torch

    from nanochat.model import GPT

    with torch.device("meta"):
        model = GPT(g.config)
    model.to_empty(device="cpu")
    sd = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in g.dense.items()}
    sd.update({k: latent_from_ternary(p, s) for k, (p, s) in g.ternary.items()})
    model.load_state_dict(sd, strict=True)
    return model.eval()
