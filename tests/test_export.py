"""GGUF and safetensors export/load: round trips, llama.cpp's bitnet layout (keys checked against hand-written names),
our GGUF reader field by field against gguf-py's GGUFReader, foreign and damaged files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from nanochat import ops
from nanochat.data.tokenizer import Tokenizer
from nanochat.export import GGUFError, export_gguf, export_safetensors, load, read_gguf
from nanochat.model import GPT, GPTConfig, torch_path_only

TEXTS = ["def add(a, b):\n    return a + b\n", "print('héllo wörld 🙂')\n", "class Foo:\n    pass\n"] * 40


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 400)


def make_model(residual: str = "standard", qk_norm: bool = False, mlp: str = "swiglu", seed: int = 0) -> GPT:
    cfg = GPTConfig(
        vocab_size=512,
        seq_len=64,
        n_layer=2,
        n_embd=256,
        n_head=4,
        n_kv_head=2,
        mlp_hidden=512,
        residual=residual,
        qk_norm=qk_norm,
        mlp=mlp,
    )
    torch.manual_seed(seed)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move away from the identity init so every tensor matters
    return m.eval()


def logits(m: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad(), torch_path_only():
        return m(torch.tensor([ids]))[0]


@pytest.mark.parametrize("residual,arch", [("standard", "bitnet"), ("mhc_lite", "nanochat"), ("mhc", "nanochat")])
@pytest.mark.parametrize("quant", ["tq2_0", "tq1_0"])
def test_gguf_roundtrip(tmp_path, tok, residual, arch, quant):
    m = make_model(residual)
    path = export_gguf(m, tok, tmp_path / "m.gguf", quant=quant)
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == arch
    types = {t.name: t.tensor_type for t in r.tensors}
    qt = gguf.GGMLQuantizationType.TQ2_0 if quant == "tq2_0" else gguf.GGMLQuantizationType.TQ1_0
    assert types["blk.0.attn_q.weight"] == qt and types["blk.1.ffn_down.weight"] == qt
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_sub_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied head: llama.cpp's bitnet refuses an output tensor
    shapes = {t.name: [int(d) for d in t.shape] for t in r.tensors}
    assert shapes["blk.0.attn_k.weight"] == [256, 128]  # GGUF lists ne[0] = in_features first
    if arch == "nanochat":
        assert r.fields["nanochat.residual"].contents() == residual
        assert "blk.0.mhc_attn.res_logits" in types
    for key in [
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.layer_norm_rms_epsilon",
    ]:
        assert f"{arch}.{key}" in r.fields
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"

    loaded = load(path)
    assert loaded.config == m.config
    ids = tok.encode("def add(a, b):\n    return a + b\nclass Foo:\n    pass\nprint('héllo wörld 🙂')")
    a, b = logits(m, ids), logits(loaded.torch_model(), ids)
    # fp16 embedding and fp16 block scales (relative error 2^-11); the int8 activation quantizer turns such tiny
    # differences into occasional one-step rounding flips, so a random model's logits move by ~1-3%
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 5e-2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75  # near-ties of a random model may flip
    # ternary tensors arrive in the kernel layout with the exact trits
    packed, scale = loaded.packed_weights()[0]["blocks.0.attn.q_proj.weight"]
    ref_packed, ref_scale = ops.pack_ternary(m.blocks[0].attn.q_proj.weight.detach())
    np.testing.assert_array_equal(packed, ref_packed.numpy())
    assert scale == pytest.approx(float(ref_scale), rel=1e-3)


def test_tokenizer_survives_gguf(tmp_path, tok):
    path = export_gguf(make_model(), tok, tmp_path / "m.gguf")
    t2 = read_gguf(path).tokenizer
    for s in ["def add(a, b):\n    return a+b", "héllo 🙂 wörld", "  indented\n\tx = 1", "<|bos|>x<|eos|>"]:
        assert t2.encode(s) == tok.encode(s)
        assert t2.decode(tok.encode(s)) == s
    assert (t2.bos_id, t2.eos_id) == (tok.bos_id, tok.eos_id)


@pytest.mark.parametrize("kw,match", [({"qk_norm": True}, "QK-norm"), ({"mlp": "relu2"}, "SwiGLU")])
def test_bitnet_refuses_what_llama_cpp_cannot_run(tmp_path, tok, kw, match):
    m = make_model(**kw)
    with pytest.raises(GGUFError, match=match):
        export_gguf(m, tok, tmp_path / "m.gguf", arch="bitnet")
    assert not (tmp_path / "m.gguf").exists()
    # the nanochat architecture expresses it, and loads back
    p = export_gguf(m, tok, tmp_path / "m.gguf", arch="nanochat")
    assert load(p).config == m.config


# llama.cpp's key names, written out by hand from gguf-py's constants (Keys.LLM / Keys.Attention / Keys.Rope /
# Keys.Tokenizer with arch "bitnet") rather than through our own writer, with the GGUF value type each is read as
UINT32, FLOAT32, STRING = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING


def bitnet_hparams(cfg: GPTConfig) -> dict[str, tuple[object, gguf.GGUFValueType]]:
    """The ``bitnet.*`` keys llama.cpp's converter writes for a config like make_model's, with literal values."""
    assert (cfg.seq_len, cfg.n_embd, cfg.n_layer, cfg.mlp_hidden, cfg.n_head, cfg.n_kv_head) == (64, 256, 2, 512, 4, 2)
    return {
        "bitnet.context_length": (64, UINT32),
        "bitnet.embedding_length": (256, UINT32),
        "bitnet.block_count": (2, UINT32),
        "bitnet.feed_forward_length": (512, UINT32),
        "bitnet.attention.head_count": (4, UINT32),
        "bitnet.attention.head_count_kv": (2, UINT32),
        "bitnet.attention.layer_norm_rms_epsilon": (1e-5, FLOAT32),
        "bitnet.rope.freq_base": (10000.0, FLOAT32),
    }


def hf_vocab(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """tokens / token_type / merges read straight from the HF tokenizer JSON, the way llama.cpp's converter does
    (added special tokens are CONTROL = 3, the rest NORMAL = 1, rows past the tokenizer [PAD{i}] UNUSED = 5)."""
    import json

    spec = json.loads(tok.to_json())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in spec["added_tokens"]}
    by_id.update(special)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [3 if i in special else 1 if i in by_id else 5 for i in range(n_vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_converter_file(path, m: GPT, tok: Tokenizer):
    """A bitnet file laid out the way llama.cpp's converter writes it, keys spelled by hand: trits*scale quantized
    by gguf itself (per-block d = scale, or d = 0 for all-zero blocks), TQ1_0 for some tensors, a separate .scale
    tensor (blocks at d = 1) for others."""
    cfg = m.config
    w = gguf.GGUFWriter(str(path), "bitnet")
    for key, (value, vtype) in bitnet_hparams(cfg).items():
        w.add_key_value(key, value, vtype)
    tokens, types, merges = hf_vocab(tok, cfg.vocab_size)
    w.add_key_value("tokenizer.ggml.model", "gpt2", STRING)
    w.add_key_value("tokenizer.ggml.pre", "gpt-2", STRING)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_key_value("tokenizer.ggml.bos_token_id", tok.bos_id, UINT32)
    w.add_key_value("tokenizer.ggml.eos_token_id", tok.eos_id, UINT32)
    from nanochat.export.names import is_ternary, to_gguf_name

    T = gguf.GGMLQuantizationType
    for i, (name, t) in enumerate(m.state_dict().items()):
        t = t.float().numpy()
        if is_ternary(name):
            trits, scale = ops.absmean_quantize(torch.from_numpy(t))
            q = (trits * scale).numpy().astype(np.float32)
            if i % 3 == 0:  # scale in a separate tensor, blocks carry 1.0
                w.add_tensor(to_gguf_name(name), gguf.quants.quantize(trits.numpy(), T.TQ2_0), raw_dtype=T.TQ2_0)
                w.add_tensor(to_gguf_name(name)[: -len(".weight")] + ".scale", np.array([float(scale)], np.float32))
            else:
                qt = T.TQ1_0 if i % 3 == 1 else T.TQ2_0
                w.add_tensor(to_gguf_name(name), gguf.quants.quantize(q, qt), raw_dtype=qt)
        else:
            w.add_tensor(to_gguf_name(name), t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_cpp_converter_layout_loads(tmp_path, tok):
    m = make_model()
    loaded = load(write_converter_file(tmp_path / "conv.gguf", m, tok))
    assert loaded.config == m.config
    text = "def add(a, b):\n    return a + b\nclass Foo:"
    assert loaded.tokenizer.encode(text) == tok.encode(text)
    ids = tok.encode("class Foo:")
    a, b = logits(m, ids), logits(loaded.torch_model(), ids)
    assert ((a - b).norm() / a.norm()).item() < 5e-2


def test_export_writes_llama_cpp_bitnet_keys(tmp_path, tok):
    """Our bitnet export holds llama.cpp's keys with the values and value types its loader reads (it refuses a key
    of the wrong type), checked against the hand-written list and the HF tokenizer, not against our writer."""
    m = make_model()
    path = export_gguf(m, tok, tmp_path / "m.gguf")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "bitnet"
    for key, (value, vtype) in bitnet_hparams(m.config).items():
        f = r.fields[key]
        assert f.types == [vtype], key
        assert f.contents() == pytest.approx(value, rel=1e-7), key
    tokens, types, merges = hf_vocab(tok, m.config.vocab_size)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert r.fields["tokenizer.ggml.tokens"].contents() == tokens
    assert r.fields["tokenizer.ggml.token_type"].contents() == types
    assert r.fields["tokenizer.ggml.merges"].contents() == merges
    assert tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()] == "<|bos|>"
    assert tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()] == "<|eos|>"
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        assert r.fields[key].types == [UINT32], key
    # tensor names and types llama.cpp's bitnet graph looks up (llm_build_bitnet), the head tied to token_embd
    names = {t.name: t.tensor_type for t in r.tensors}
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sub_norm", "ffn_norm", "ffn_gate",
                 "ffn_up", "ffn_down", "ffn_sub_norm"]  # fmt: skip
    want = {"token_embd.weight", "output_norm.weight"} | {f"blk.{b}.{n}.weight" for b in range(2) for n in per_block}
    assert set(names) == want
    T = gguf.GGMLQuantizationType
    for b in range(2):
        for n in ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]:
            assert names[f"blk.{b}.{n}.weight"] == T.TQ2_0
        for n in ["attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm"]:
            assert names[f"blk.{b}.{n}.weight"] == T.F32


def write_f16_file(path, m: GPT, tok: Tokenizer):
    """Every tensor of the model as F16 (BitLinear weights too, as a float converter would leave them), a Q8_0 and
    an F32 extra, a 64-byte alignment, and one metadata key of every GGUF value type and array element type."""
    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_custom_alignment(64)
    for key, (value, vtype) in bitnet_hparams(m.config).items():
        w.add_key_value(key, value, vtype)
    scalars = [(V.UINT8, 200), (V.INT8, -100), (V.UINT16, 60000), (V.INT16, -30000), (V.UINT32, 4_000_000_000),
               (V.INT32, -2_000_000_000), (V.UINT64, 2**63 + 5), (V.INT64, -(2**62)), (V.FLOAT32, 0.1),
               (V.FLOAT64, 0.1), (V.BOOL, True), (V.BOOL, False), (V.STRING, "héllo 🙂"), (V.STRING, "")]  # fmt: skip
    for i, (vtype, value) in enumerate(scalars):
        w.add_key_value(f"test.scalar{i}", value, vtype)
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1e-3])
    w.add_array("test.strings", ["a", "🙂", ""])
    w.add_array("test.bools", [True, False])
    w.add_array("test.empty", [])
    tokens, types, merges = hf_vocab(tok, m.config.vocab_size)
    w.add_key_value("tokenizer.ggml.model", "gpt2", V.STRING)
    w.add_key_value("tokenizer.ggml.pre", "gpt-2", V.STRING)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", merges)
    w.add_key_value("tokenizer.ggml.bos_token_id", tok.bos_id, V.UINT32)
    w.add_key_value("tokenizer.ggml.eos_token_id", tok.eos_id, V.UINT32)
    from nanochat.export.names import to_gguf_name

    for name, t in m.state_dict().items():
        w.add_tensor(to_gguf_name(name), t.float().numpy().astype(np.float16))
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    Q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("extra.q8_0", gguf.quants.quantize(x, Q8), raw_dtype=Q8)
    w.add_tensor("extra.f32", np.arange(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("kind", ["ours_tq2_0", "ours_tq1_0_mhc", "f16", "converter_tq2_0"])
def test_gguf_file_reader_matches_gguf_reader(tmp_path, tok, kind):
    """Our hand-written reader (export/gguf_file.py) against gguf-py's GGUFReader, field by field: the same keys in
    file order, each value equal and of the same Python type, the same tensors (name, shape, type) over the same
    bytes."""
    from nanochat.export.gguf_file import GGUFFile

    path = tmp_path / f"{kind}.gguf"
    if kind == "ours_tq2_0":
        export_gguf(make_model(), tok, path)
    elif kind == "ours_tq1_0_mhc":
        export_gguf(make_model("mhc_lite"), tok, path, quant="tq1_0")
    elif kind == "f16":
        write_f16_file(path, make_model(), tok)
    else:
        write_converter_file(path, make_model(), tok)
    ref, ours = gguf.GGUFReader(str(path)), GGUFFile(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # GGUF.* are header pseudo-keys
    assert ours.version == ref.fields["GGUF.version"].contents() == 3
    assert list(ours.fields) == list(ref_fields)
    for key, f in ref_fields.items():
        want, got = f.contents(), ours.fields[key]
        assert got == want and type(got) is type(want), key
        if isinstance(want, list):
            assert [type(x) for x in got] == [type(x) for x in want], key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors, strict=True):
        assert a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.type == int(b.tensor_type), a.name
        assert a.data.nbytes == b.n_bytes and a.data.tobytes() == np.asarray(b.data).tobytes(), a.name
    if kind == "ours_tq1_0_mhc":
        assert any(t.type == gguf.GGMLQuantizationType.TQ1_0 for t in ours.tensors)
    if kind == "f16":
        assert ours.fields["general.alignment"] == 64 and ref.tensors[-1].data_offset % 64 == 0


def test_damaged_and_foreign_files(tmp_path, tok):
    good = export_gguf(make_model(), tok, tmp_path / "good.gguf")
    data = good.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + data[4:])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf(tmp_path / "magic.gguf")
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_gguf(tmp_path / "trunc.gguf")
    (tmp_path / "tiny.gguf").write_bytes(data[:40])
    with pytest.raises(GGUFError, match="corrupt or truncated"):
        read_gguf(tmp_path / "tiny.gguf")
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")

    def rewrite(name: str, arch: str = "bitnet", drop: str | None = None, reshape: str | None = None) -> str:
        r = gguf.GGUFReader(str(good))
        w = gguf.GGUFWriter(str(tmp_path / name), arch)
        for k, f in r.fields.items():
            if k.startswith(("GGUF.", "general.architecture")):
                continue
            val = f.contents()
            k2 = k.replace("bitnet.", f"{arch}.")
            vt = f.types[0]
            if vt == gguf.GGUFValueType.ARRAY:
                w.add_array(k2, val)
            else:
                w.add_key_value(k2, val, vt)
        for t in r.tensors:
            if t.name == drop:
                continue
            arr = np.asarray(t.data)
            if t.name == reshape:
                arr = arr[:-1]
            w.add_tensor(t.name, arr, raw_dtype=t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return str(tmp_path / name)

    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        read_gguf(rewrite("arch.gguf", arch="llama"))
    with pytest.raises(GGUFError, match=r"missing tensor\(s\) \['blk.1.ffn_up.weight'\]"):
        read_gguf(rewrite("drop.gguf", drop="blk.1.ffn_up.weight"))
    with pytest.raises(GGUFError, match="blk.0.attn_norm.weight.*shape"):
        read_gguf(rewrite("shape.gguf", reshape="blk.0.attn_norm.weight"))
    with pytest.raises(ValueError, match="unknown model format"):
        load(tmp_path / "x.bin") if (tmp_path / "x.bin").write_bytes(b"hello") else None


def test_safetensors_roundtrip(tmp_path, tok):
    m = make_model("mhc_lite")
    p = export_safetensors(m, tok, tmp_path / "m.safetensors")
    assert (tmp_path / "m.json").exists()
    loaded = load(p)
    ids = tok.encode("print(1)")
    torch.testing.assert_close(logits(loaded.torch_model(), ids), logits(m, ids), rtol=0, atol=0)
    assert loaded.tokenizer.encode("héllo") == tok.encode("héllo")
    (tmp_path / "bad.safetensors").write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt|not a nanochat"):
        load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("residual", ["standard", "mhc_lite", "mhc"])
@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "mlp": "relu2", "tie_embeddings": False}])
def test_expected_shapes_match_the_model(residual, kw):
    from nanochat.export.gguf_io import expected_shapes

    cfg = GPTConfig(
        vocab_size=300, n_layer=2, n_embd=256, n_head=4, n_kv_head=2, mlp_hidden=512, residual=residual, **kw
    )
    with torch.device("meta"):
        m = GPT(cfg)
    assert expected_shapes(cfg) == {k: tuple(v.shape) for k, v in m.state_dict().items()}


def test_export_writes_llama_cpp_end_of_generation_and_add_bos_keys(tmp_path, tok):
    """Keys named by gguf-py's constants: llama.cpp stops at EOS, EOT and EOM (plus tokens it knows by text), so both
    our end of message and our end of text end its generation; add_bos_token says what our prompts do."""
    path = export_gguf(make_model(), tok, tmp_path / "m.gguf")
    K = gguf.Keys.Tokenizer
    r = gguf.GGUFReader(str(path))
    f = {k: r.fields[k].contents() for k in (K.BOS_ID, K.EOS_ID, K.EOT_ID, K.PAD_ID, K.ADD_BOS, K.ADD_EOS)}
    assert f == {K.BOS_ID: tok.bos_id, K.EOS_ID: tok.eos_id, K.EOT_ID: tok.end_id, K.PAD_ID: tok.pad_id,
                 K.ADD_BOS: False, K.ADD_EOS: False}  # fmt: skip
    # llama.cpp's special_eog_ids (llama-vocab.cpp): tokens matched by text, then the eos/eot/eom ids
    tokens = r.fields[K.LIST].contents()
    by_text = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>"}
    eog = {i for i, t in enumerate(tokens) if t in by_text} | {f[K.EOS_ID], f[K.EOT_ID]}
    assert {tok.eos_id, tok.end_id} <= eog
    back = load(path).tokenizer
    assert (back.add_bos, back.eot_id, back.eog_ids) == (False, tok.end_id, frozenset({tok.eos_id, tok.end_id}))
    # a tokenizer whose prompts start with BOS says so, and that survives the round trip
    tok.add_bos = True
    try:
        p2 = export_gguf(make_model(), tok, tmp_path / "bos.gguf")
    finally:
        tok.add_bos = False
    assert gguf.GGUFReader(str(p2)).fields[K.ADD_BOS].contents() is True
    back = load(p2).tokenizer
    assert back.add_bos is True and back.encode_prompt("x = 1") == [tok.bos_id, *tok.encode("x = 1")]


def test_exported_chat_template_renders_what_render_chat_builds(tmp_path, tok):
    """The template other runtimes read (jinja2, as llama.cpp's --jinja and HF do) gives our chat ids."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    path = export_gguf(make_model(), tok, tmp_path / "m.gguf")
    template = gguf.GGUFReader(str(path)).fields[gguf.Keys.Tokenizer.CHAT_TEMPLATE].contents()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    text = (
        ImmutableSandboxedEnvironment()
        .from_string(template)
        .render(messages=msgs, add_generation_prompt=True, bos_token="<|bos|>", eos_token="<|eos|>")
    )
    assert tok.encode(text, allow_special=True) == tok.render_chat(msgs)
