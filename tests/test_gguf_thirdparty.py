"""Bitnet GGUF files other people make (issue 15): written here with gguf-py's GGUFWriter the way llama.cpp's
``convert_hf_to_gguf.py`` lays out a ``BitnetForCausalLM`` and ``llama-quantize`` rewrites it — never with our own
writer — then loaded, run on the Rust and torch backends, and checked against the float model they came from.

What the converter does and these files copy: arch ``bitnet``, its tensor names (token_embd first, output_norm last),
GPT-2 byte-level BPE (``tokenizer.ggml.model = "gpt2"``, tokens / token_type / merges, ``<|endoftext|>`` as BOS and
EOS, ``add_bos_token = true``, no nanochat chat tokens), the BitLinear weights quantized on the way out
(``weight_quant``: ``round(w / mean|w|)`` clamped, times ``mean|w|``) and stored as F16/F32 floats or as TQ1_0/TQ2_0
(``gguf.quants.quantize``: per-block ``d = max|x|``), the embedding as F16, or as ``llama-quantize`` leaves it
(Q6_K by default; Q8_0, BF16 and F32 too).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType as T
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from nanochat.data.tokenizer import ChatTemplateError
from nanochat.engine import Engine
from nanochat.export import export_gguf, load
from nanochat.model import GPT, GPTConfig, torch_path_only

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "print('hello world')\n",
    "class Foo:\n    pass\n",
    "for i in range(10):\n    x = i * 2\n",
] * 30
EOT = "<|endoftext|>"
VOCAB = 384  # the model's rows: the tokenizer's tokens plus [PAD] rows, as the converter pads them
# state-dict suffix -> llama.cpp's bitnet tensor name (spelled out here, independently of nanochat.export.names)
BLOCK = {
    "attn_norm.weight": "attn_norm",
    "attn.q_proj.weight": "attn_q",
    "attn.k_proj.weight": "attn_k",
    "attn.v_proj.weight": "attn_v",
    "attn.o_proj.weight": "attn_output",
    "attn.sub_norm.weight": "attn_sub_norm",
    "mlp_norm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
    "mlp.sub_norm.weight": "ffn_sub_norm",
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- what the converter writes


@pytest.fixture(scope="module")
def hf_tok() -> HFTokenizer:
    return gpt2_like_tokenizer()


def gpt2_like_tokenizer() -> HFTokenizer:
    """A GPT-2 style byte-level BPE with ``<|endoftext|>`` as its one special token, last (GPT-2 has it at 50256)."""
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(TEXTS, trainer=trainer)
    raw.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return raw


def vocab_fields(raw: HFTokenizer) -> tuple[list[str], list[int], list[str]]:
    """tokens / token_type / merges the way ``_set_vocab_gpt2`` writes them: [PAD{i}] rows up to the model's."""
    spec = json.loads(raw.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    inv = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(VOCAB):
        if i in inv:
            tokens.append(inv[i])
            types.append(int(gguf.TokenType.CONTROL if inv[i] == EOT else gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def make_model(seed: int = 0) -> GPT:
    cfg = GPTConfig(vocab_size=VOCAB, seq_len=64, n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=512,
                    residual="standard", qk_norm=False, mlp="swiglu")  # fmt: skip
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # away from the identity init, so every tensor matters
    return m.eval()


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """``BitnetModel.weight_quant`` of llama.cpp's converter."""
    w = w.float()
    iscale = 1 / w.abs().mean().clamp(min=1e-5)
    return (w * iscale).round().clamp(-1, 1) / iscale


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """ggml's block_q6_K, 210 bytes per 256 weights: ``ql[128]`` low nibbles, ``qh[64]`` high 2-bit pairs, 16 int8
    sub-block scales, fp16 ``d``. gguf-py only dequantizes Q6_K, so this plain (not error-optimal) quantizer stands
    in for llama-quantize; a test holds it against ``gguf.quants.dequantize``."""
    rows = x.shape[0]
    blocks = x.reshape(-1, 256).astype(np.float32)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(-1) / 31  # q in -32..31
    d16 = (sub_scale.max(-1) / 127).astype(np.float16)
    d = d16.astype(np.float32)[:, None]
    sc = np.where(d > 0, np.round(sub_scale / np.where(d > 0, d, 1)), 0).clip(-128, 127).astype(np.int8)
    eff = (d * sc)[..., None]
    q = np.where(eff > 0, np.round(sub / np.where(eff > 0, eff, 1)), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.reshape(n, 256).astype(np.uint8)
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for h in range(2):  # element 128h + 64s + j: low nibble in ql[64h + j] at shift 4s
        for s in range(2):
            ql[:, 64 * h : 64 * h + 64] |= (q[:, 128 * h + 64 * s : 128 * h + 64 * s + 64] & 0xF) << (4 * s)
        for k in range(4):  # element 128h + 32k + j: high bits in qh[32h + j] at shift 2k
            qh[:, 32 * h : 32 * h + 32] |= (q[:, 128 * h + 32 * k : 128 * h + 32 * k + 32] >> 4) << (2 * k)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(n, 2)], axis=1)
    return out.reshape(rows, -1)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """ggml's block_q4_K, 144 bytes per 256 weights: fp16 ``d`` and ``dmin``, 12 bytes of 6-bit sub-block scales
    and mins, ``qs[128]`` nibbles; weight = d·sc·q − dmin·m per 32-weight sub-block. A plain quantizer, like
    :func:`quantize_q6_k` (gguf-py dequantizes Q4_K only)."""
    rows = x.shape[0]
    sub = x.reshape(-1, 8, 32).astype(np.float32)
    n = sub.shape[0]
    lo = np.minimum(sub.min(-1), 0)  # (n, 8): weight = scale·q − min, q in 0..15
    scale_f = (sub.max(-1) - lo) / 15
    d16 = (scale_f.max(-1) / 63).astype(np.float16)
    dmin16 = (-lo.min(-1) / 63).astype(np.float16)
    d, dmin = d16.astype(np.float32)[:, None], dmin16.astype(np.float32)[:, None]
    sc = np.where(d > 0, np.round(scale_f / np.where(d > 0, d, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dmin > 0, np.round(-lo / np.where(dmin > 0, dmin, 1)), 0).clip(0, 63).astype(np.uint8)
    eff = (d * sc)[..., None]
    q = np.where(eff > 0, np.round((sub + (dmin * mn)[..., None]) / np.where(eff > 0, eff, 1)), 0)
    q = q.clip(0, 15).astype(np.uint8)  # (n, 8, 32)
    scales = np.zeros((n, 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n, 128)  # sub-block 2k in the low nibbles of qs[32k:32k+32]
    out = np.concatenate([d16.view(np.uint8).reshape(n, 2), dmin16.view(np.uint8).reshape(n, 2), scales, qs], 1)
    return out.reshape(rows, -1)


def encode_tensor(x: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return x.astype(np.float32)
    if qtype == T.F16:
        return x.astype(np.float16)
    if qtype == T.Q6_K:
        return quantize_q6_k(x)
    if qtype == T.Q4_K:
        return quantize_q4_k(x)
    return gguf.quants.quantize(x.astype(np.float32), qtype)


def write_converter_gguf(
    path: Path,
    m: GPT,
    raw: HFTokenizer,
    *,
    linear: T = T.TQ2_0,
    embd: T = T.F16,
    latent: bool = False,
    chat_template: str | None = None,
    add_bos: bool = True,
    output: T | None = None,
) -> Path:
    """A bitnet GGUF as llama.cpp's converter (and llama-quantize for ``embd``) writes it. ``latent``: write the
    BitLinear weights unquantized (a float file nobody's converter makes, but someone's exporter might)."""
    cfg = m.config
    sd = {k: v.detach().float() for k, v in m.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name("Bitnet Test")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.seq_len)
    w.add_embedding_length(cfg.n_embd)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if linear == T.TQ2_0 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(1.0)
    tokens, types, merges = vocab_fields(raw)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(EOT))
    w.add_eos_token_id(tokens.index(EOT))
    w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def put(name: str, x: np.ndarray, qtype: T) -> None:
        data = encode_tensor(x, qtype)
        w.add_tensor(name, data, raw_shape=data.shape if qtype not in (T.F32, T.F16) else None, raw_dtype=qtype)

    put("token_embd.weight", sd["wte.weight"].numpy(), embd)
    for i in range(cfg.n_layer):
        for suffix, gname in BLOCK.items():
            t = sd[f"blocks.{i}.{suffix}"]
            if suffix.split(".")[-2] in LINEAR:
                q = t if latent else weight_quant(t)
                put(f"blk.{i}.{gname}.weight", q.numpy(), linear)
            else:
                put(f"blk.{i}.{gname}.weight", t.numpy(), T.F32)
    put("output_norm.weight", sd["norm.weight"].numpy(), T.F32)
    if output is not None:
        put("output.weight", sd["wte.weight"].numpy(), output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------- checks


def full_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), torch_path_only():
        return model(torch.tensor([ids]))[0].float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_greedy_agrees(got: list[int], model: GPT, prompt: list[int], tie: float = 3e-2) -> None:
    """``got`` (greedy tokens from an engine) against an uncached argmax loop on the torch model: equal, or split
    only where the torch model's top two logits are within ``tie`` of the logit scale (an int8 rounding flip)."""
    ids = list(prompt)
    for step, tok in enumerate(got):
        lg = full_logits(model, ids)[-1]
        want = int(lg.argmax())
        if tok != want:
            gap = float(lg[want] - lg[tok])
            assert gap <= tie * float(lg.abs().max()), f"step {step}: engine chose {tok}, torch {want} (gap {gap})"
            return  # after a legitimate split the continuations differ
        ids.append(tok)


VARIANTS = {
    # name: (linear type, embedding type)
    "tq2_0+f16": (T.TQ2_0, T.F16),
    "tq1_0+f16": (T.TQ1_0, T.F16),
    "tq2_0+q6_k": (T.TQ2_0, T.Q6_K),  # llama-quantize's default for bitnet
    "tq2_0+q4_k": (T.TQ2_0, T.Q4_K),
    "tq2_0+q8_0": (T.TQ2_0, T.Q8_0),
    "tq2_0+bf16": (T.TQ2_0, T.BF16),
    "f16+f16": (T.F16, T.F16),  # the converter's --outtype f16: ternary-valued floats
    "f32+f32": (T.F32, T.F32),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converter_files_load_and_both_backends_agree(tmp_path, hf_tok, variant):
    linear, embd = VARIANTS[variant]
    m = make_model()
    path = write_converter_gguf(tmp_path / f"{variant}.gguf", m, hf_tok, linear=linear, embd=embd)
    loaded = load(path)
    tok = loaded.tokenizer
    eot = hf_tok.token_to_id(EOT)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.has_chat_tokens) == (eot, eot, True, False)
    assert loaded.config == m.config

    # the weights: exact trits and the converter's scale, whatever the storage type
    ternary, dense = loaded.packed_weights()
    for name in ("blocks.0.attn.q_proj.weight", "blocks.1.mlp.down_proj.weight"):
        packed, scale = ternary[name]
        from nanochat.ops import unpack_ternary

        trits = unpack_ternary(torch.from_numpy(np.ascontiguousarray(packed)))
        ref = weight_quant(m.state_dict()[name])
        s_ref = float(ref.abs().max())
        assert scale == pytest.approx(s_ref, rel=1e-3)  # the fp16 block d or the f16 value: 2^-11
        torch.testing.assert_close(trits, torch.sign(ref), rtol=0, atol=0)
    wte = m.state_dict()["wte.weight"].numpy()
    err = {T.F16: 1e-3, T.BF16: 1e-2, T.F32: 0.0, T.Q8_0: 2e-2, T.Q6_K: 3e-2, T.Q4_K: 8e-2}[embd]
    np.testing.assert_allclose(np.asarray(dense["wte.weight"], np.float32), wte, atol=err * np.abs(wte).max())

    # the independent reference: the float model the file was converted from, with the embedding it was stored as
    stored = gguf.quants.dequantize(encode_tensor(wte, embd), embd).reshape(wte.shape)
    with torch.no_grad():
        m.wte.weight.copy_(torch.from_numpy(np.asarray(stored, np.float32)))
    prompt = [eot, *tok.encode("def add(a, b):\n    return")]
    ref = full_logits(m, prompt)
    torch_model = loaded.torch_model()
    got_torch = full_logits(torch_model, prompt)
    assert rel(got_torch, ref) < 5e-2
    rust = Engine(loaded, backend="rust")
    s = rust.rust.new_session()
    got_rust = torch.from_numpy(rust.rust.forward([s], [prompt], all_logits=True)).reshape(got_torch.shape)
    assert rel(got_rust, got_torch) < 3e-2
    assert (got_rust.argmax(-1) == got_torch.argmax(-1)).float().mean() >= 0.75  # near-ties may flip
    # generation: greedy on both backends follows the torch model's argmax
    for backend in ("rust", "torch"):
        res = Engine(loaded, backend=backend).generate(prompt, max_new_tokens=8, temperature=0, stop_token_ids=[])
        assert len(res.token_ids) == 8
        assert_greedy_agrees(res.token_ids, torch_model, prompt)


@pytest.mark.parametrize("qtype,budget", [(T.Q6_K, 0.03), (T.Q4_K, 0.08)])
def test_k_quant_test_quantizers_match_gguf_dequantize(qtype, budget):
    """The Q6_K/Q4_K writers above are test doubles: ggml's layout is what gguf-py's dequantizer reads back."""
    x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(encode_tensor(x, qtype), qtype)
    assert back.shape == x.shape
    assert np.abs(back - x).max() < budget * np.abs(x).max()
    assert np.abs(back - x).mean() < budget / 4 * np.abs(x).max()


def test_float_linear_weights_are_ternarized_at_load(tmp_path, hf_tok, caplog):
    """F16 ternary-valued weights keep their exact scale (the absmean of ``trits·s`` is ``s·p``, not ``s``); latent
    float weights get the absmean rule, with a warning, and run on the Rust engine either way."""
    m = make_model(1)
    caplog.set_level(logging.INFO, logger="nanochat.export")
    exact = load(write_converter_gguf(tmp_path / "f16.gguf", m, hf_tok, linear=T.F16))
    assert any("hold ternary values" in r.getMessage() for r in caplog.records)
    name = "blocks.0.mlp.up_proj.weight"
    s_ref = float(weight_quant(m.state_dict()[name]).abs().max())
    assert exact.packed_weights()[0][name][1] == pytest.approx(s_ref, rel=1e-3)

    caplog.clear()
    latent = load(write_converter_gguf(tmp_path / "latent.gguf", m, hf_tok, linear=T.F32, embd=T.F32, latent=True))
    assert any(r.levelno == logging.WARNING and "absmean" in r.getMessage() for r in caplog.records)
    w = m.state_dict()[name].numpy()
    s = np.abs(w).mean()  # plain numpy absmean: BitNet b1.58's rule
    packed, scale = latent.packed_weights()[0][name]
    from nanochat.ops import unpack_ternary

    trits = unpack_ternary(torch.from_numpy(np.ascontiguousarray(packed))).numpy()
    np.testing.assert_array_equal(trits, np.clip(np.round(w / s), -1, 1))
    assert scale == pytest.approx(float(s), rel=1e-6)
    # the latent weights are what the float model holds: the loaded model computes what it does
    ids = [1, 2, 3, 4, 5, 6]
    assert rel(full_logits(latent.torch_model(), ids), full_logits(m, ids)) < 1e-3
    eng = Engine(latent, backend="rust")
    assert eng.generate(ids, max_new_tokens=4, temperature=0, stop_token_ids=[]).finish_reason == "length"


def test_untied_output_weight_is_dequantized(tmp_path, hf_tok):
    m = make_model(2)
    loaded = load(write_converter_gguf(tmp_path / "out.gguf", m, hf_tok, embd=T.Q8_0, output=T.Q6_K))
    assert loaded.config.tie_embeddings is False
    head = np.asarray(loaded.packed_weights()[1]["lm_head.weight"])
    wte = m.state_dict()["wte.weight"].numpy()
    np.testing.assert_allclose(head, wte, atol=0.04 * np.abs(wte).max())
    ids = [3, 1, 4, 1, 5]
    got = Engine(loaded, backend="rust").generate(ids, max_new_tokens=6, temperature=0, stop_token_ids=[])
    assert_greedy_agrees(got.token_ids, loaded.torch_model(), ids)


def test_base_model_tokenizer(tmp_path, hf_tok):
    """Completions work like the HF tokenizer the file came from; add_bos_token is honoured; chat is refused with
    a ValueError (HTTP 400 in the server) unless the file has a chat template, which is rendered."""
    m = make_model()
    tok = load(write_converter_gguf(tmp_path / "base.gguf", m, hf_tok)).tokenizer
    eot = hf_tok.token_to_id(EOT)
    for text in ["def add(a, b):\n    return a + b", "  x = 1\n\tprint(x)", f"a{EOT}b"]:
        want = hf_tok.encode(text, add_special_tokens=False).ids
        if EOT not in text:
            assert tok.encode(text) == want
        assert tok.encode(text, allow_special=True) == want
        assert tok.encode_prompt(text) == [eot, *tok.encode(text)]  # llama-tokenize prepends BOS for such a file
        assert tok.decode(tok.encode(text)) == text
    assert tok.eog_ids == frozenset({eot}) and tok.end_id == eot and tok.pad_id == eot
    assert tok.special_ids == {EOT: eot}
    with pytest.raises(ChatTemplateError, match="base model"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="chat"):
        tok.render_conversation([{"role": "user", "content": "hi"}])
    # the stop token ends a generation by default
    eng = Engine(load(tmp_path / "base.gguf"), backend="rust")
    assert eng._stop_ids(None) == frozenset({eot})

    text = "def add(a, b):"
    assert eng.generate(text, max_new_tokens=1, temperature=0).prompt_tokens == len(tok.encode(text)) + 1  # BOS
    no_bos_model = load(write_converter_gguf(tmp_path / "nobos.gguf", m, hf_tok, add_bos=False))
    no_bos = no_bos_model.tokenizer
    assert no_bos.add_bos is False and no_bos.encode_prompt("x = 1") == no_bos.encode("x = 1")
    res = Engine(no_bos_model, backend="rust").generate(text, max_new_tokens=1, temperature=0)
    assert res.prompt_tokens == len(tok.encode(text))

    chat = load(write_converter_gguf(tmp_path / "chat.gguf", m, hf_tok, chat_template=CHATML)).tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat.render_chat(msgs) == hf_tok.encode(text, add_special_tokens=False).ids
    broken = load(write_converter_gguf(tmp_path / "bad.gguf", m, hf_tok, chat_template="{% if %}")).tokenizer
    with pytest.raises(ChatTemplateError, match="does not compile"):
        broken.render_chat(msgs)
    refusing = "{{ raise_exception('system messages are not supported') }}"
    with pytest.raises(ChatTemplateError, match="not supported"):
        load(write_converter_gguf(tmp_path / "r.gguf", m, hf_tok, chat_template=refusing)).tokenizer.render_chat(msgs)


def test_reexported_base_model_keeps_its_tokenizer_keys(tmp_path, hf_tok):
    """A third-party file written back by our exporter keeps BOS/EOS, add_bos_token and its own chat template (not
    ours, whose role tokens it lacks); llama.cpp reads the same keys from both."""
    m = make_model()
    src = load(write_converter_gguf(tmp_path / "src.gguf", m, hf_tok, chat_template=CHATML))
    out = export_gguf(src.torch_model(), src.tokenizer, tmp_path / "ours.gguf")
    K = gguf.Keys.Tokenizer
    fields = gguf.GGUFReader(str(out)).fields
    eot = hf_tok.token_to_id(EOT)
    assert [fields[k].contents() for k in (K.BOS_ID, K.EOS_ID, K.ADD_BOS, K.CHAT_TEMPLATE)] == [eot, eot, True, CHATML]
    back = load(out)
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id, back.tokenizer.add_bos) == (eot, eot, True)
    text = "def add(a, b):\n    return a + b"
    assert back.tokenizer.encode_prompt(text) == src.tokenizer.encode_prompt(text)
    np.testing.assert_array_equal(back.packed_weights()[0]["blocks.0.attn.q_proj.weight"][0],
                                  src.packed_weights()[0]["blocks.0.attn.q_proj.weight"][0])  # fmt: skip


def test_server_on_a_base_model_file(tmp_path, hf_tok):
    """Served, a base-model file refuses chat with a 400 (not a 500) and ends a completion at its own EOS."""
    import httpx
    from serve_fakes import ServerThread

    from nanochat.serve import EngineBackend, Settings, create_app

    path = write_converter_gguf(tmp_path / "base.gguf", make_model(), hf_tok)
    eot = hf_tok.token_to_id(EOT)
    backend = EngineBackend.from_path(path, threads=1)
    assert eot in backend.stop_token_ids
    with ServerThread(create_app(backend, Settings())) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "chat_unsupported" and "base model" in r.json()["error"]["message"]
        # force <|endoftext|> first: the completion must end there, not run to max_tokens
        body = {"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 0, "logit_bias": {str(eot): 100}}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and r.json()["usage"]["completion_tokens"] <= 1, r.json()
