"""The fast GGUF load path (issue 13 item 3): what it skips must not change what a file means.

- the XXH3-128 checksum (Rust) against xxHash's reference vector and its stream property; files with the older
  SHA-256 key still verify, and a flipped byte in them is still refused;
- the tokenizer cached in our exports (``nanochat.tokenizer.json``) gives the tokenizer the ``tokenizer.ggml.*``
  arrays give (the slow, checked path is the reference), and is used only when the checksum holds;
- long string arrays decoded lazily read back what gguf-py's reader reads, and are still bounds-checked at open;
- ``LoadedModel.release_pages()`` after the Rust engine is built: the engine's logits do not change, and the packed
  weights and the torch model come back from the file equal to what they were;
- the tokenizer's plain and special-aware encodes through one HF tokenizer (a flag toggled under a lock), from many
  threads at once, and after pickling.
"""

from __future__ import annotations

import pickle
import struct
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_faults import tiny_gpt

from nanochat import ops
from nanochat.data.tokenizer import Tokenizer
from nanochat.engine import Engine
from nanochat.export import export_gguf, export_safetensors, load
from nanochat.export.gguf_file import LAZY_STRING_ARRAY, GGUFFile, GGUFFormatError, LoadError, hex_digest
from nanochat.export.gguf_io import CHECKSUM_EXCLUDED, GGUFError, _tokenizer_from_gguf, seal_gguf
from nanochat.export.names import CHECKSUM_KEY, CHECKSUM_KEY_SHA256, TOKENIZER_JSON_KEY
from nanochat.export.safetensors_io import content_digest, safetensors_header

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
] * 40


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 400)


@pytest.fixture(scope="module")
def exported(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_gguf(tiny_gpt(), tok, tmp_path_factory.mktemp("fast") / "m.gguf")


def copy_with(src: Path, dst: Path, drop: tuple[str, ...] = (), add: dict[str, str] | None = None) -> Path:
    """A copy through gguf's writer with some keys dropped and some string keys added (tensors unchanged)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in drop:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for k, v in (add or {}).items():
        w.add_string(k, v)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


# ----------------------------------------------------------------------------- the checksum


def test_xxh3_128_matches_the_reference_vector_and_hashes_a_stream() -> None:
    # XXH128 of no bytes (seed 0), from xxHash's sanity tests; parts are one stream, bytes or uint8 arrays
    assert ops.xxh3_128_hex([]) == "99aa06d3014798d86001c324468d497f"
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    whole = ops.xxh3_128_hex([data])
    assert len(whole) == 32 and int(whole, 16) >= 0
    assert ops.xxh3_128_hex([data[:7].tobytes(), data[7:5000], data[5000:].tobytes()]) == whole
    flipped = data.copy()
    flipped[77_777] ^= 0x04
    assert ops.xxh3_128_hex([flipped]) != whole
    assert ops.xxh3_128_hex([data[:-1]]) != whole
    # the SHA-256 twin hashes the same stream as hashlib does
    import hashlib

    assert hex_digest("sha256", [data[:10], data[10:]]) == hashlib.sha256(data.tobytes()).hexdigest()
    with pytest.raises(TypeError, match=r"parts\[1\]: expected dtype uint8"):
        ops.xxh3_128_hex([b"x", np.zeros(4, np.uint16)])
    with pytest.raises(TypeError, match=r"parts\[0\]: expected bytes or a numpy uint8 array, got str"):
        ops.xxh3_128_hex(["text"])
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md5'"):
        hex_digest("md5", [b""])


def test_exports_carry_xxh3_and_an_older_sha256_gguf_still_verifies(exported: Path, tmp_path: Path) -> None:
    r = GGUFFile(exported)
    assert CHECKSUM_KEY_SHA256 not in r.fields
    assert r.fields[CHECKSUM_KEY] == r.content_digest(CHECKSUM_EXCLUDED)
    assert r.content_digest(CHECKSUM_EXCLUDED, "sha256") != r.content_digest(CHECKSUM_EXCLUDED)
    del r
    # a file as exports wrote it before: the SHA-256 key, sealed with SHA-256
    old = copy_with(exported, tmp_path / "old.gguf", drop=(CHECKSUM_KEY,), add={CHECKSUM_KEY_SHA256: "0" * 64})
    digest = seal_gguf(old)
    assert len(digest) == 64
    r = GGUFFile(old)
    assert r.fields[CHECKSUM_KEY_SHA256] == digest == r.content_digest(CHECKSUM_EXCLUDED, "sha256")
    del r
    m = load(old)
    assert m.config == load(exported).config
    # verified, so its cached tokenizer was used: the same as the current export's
    assert m.tokenizer.to_json() == load(exported).tokenizer.to_json()
    data = bytearray(old.read_bytes())
    at = len(data) - 1000  # inside the last tensor's data (a norm: no structural check looks at its values)
    data[at] ^= 0x10
    bad = tmp_path / "old_flipped.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=rf"{bad}: checksum mismatch \({CHECKSUM_KEY_SHA256} is"):
        load(bad)


def test_an_older_sha256_safetensors_export_still_verifies(tok: Tokenizer, tmp_path: Path) -> None:
    st = export_safetensors(tiny_gpt(), tok, tmp_path / "m.safetensors")
    _, meta = safetensors_header(st)
    assert len(meta[CHECKSUM_KEY]) == 32 and CHECKSUM_KEY_SHA256 not in meta
    # rewrite it as exports wrote it before: the SHA-256 of the same content under the old key
    data = st.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    import json

    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    meta = header["__metadata__"]
    del meta[CHECKSUM_KEY]
    tensors = {
        k: (v["dtype"], tuple(v["shape"]), memoryview(body[v["data_offsets"][0] : v["data_offsets"][1]]))
        for k, v in header.items()
        if k != "__metadata__"
    }
    meta[CHECKSUM_KEY_SHA256] = content_digest(meta, tensors, "sha256")
    raw = json.dumps(header).encode()
    old = tmp_path / "old.safetensors"
    old.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    assert load(old).config == load(st).config
    flipped = bytearray(old.read_bytes())
    flipped[8 + len(raw) + 101] ^= 1
    old.write_bytes(bytes(flipped))
    with pytest.raises(LoadError, match=f"checksum mismatch \\({CHECKSUM_KEY_SHA256} is"):
        load(old)


# ----------------------------------------------------------------------------- the cached tokenizer


SAMPLES = ["def f(x):\n    return x + 1\n", "<|bos|>text with a special token<|eos|>", "ünïcödé  \t\n", ""]


def test_the_cached_tokenizer_is_the_one_the_gguf_arrays_give(exported: Path, tok: Tokenizer) -> None:
    r = GGUFFile(exported)
    cached = r.fields[TOKENIZER_JSON_KEY]
    fast = _tokenizer_from_gguf(r, cached)
    slow = _tokenizer_from_gguf(r)  # the reference: rebuilt from tokenizer.ggml.* with every entry checked
    assert fast.raw.get_vocab(with_added_tokens=True) == slow.raw.get_vocab(with_added_tokens=True)
    for ids_of in (
        lambda t, s: t.encode(s),
        lambda t, s: t.encode(s, allow_special=True),
        lambda t, s: t.encode_prompt(s),
    ):
        for s in SAMPLES:
            assert ids_of(fast, s) == ids_of(slow, s) == ids_of(tok, s), s
    for attr in ("bos_id", "eos_id", "eot_id", "pad_id", "add_bos", "chat_template", "special_ids"):
        assert getattr(fast, attr) == getattr(slow, attr), attr
    assert fast.fim_ids() == slow.fim_ids()
    assert fast.decode(tok.encode(SAMPLES[0])) == SAMPLES[0]
    assert load(exported).tokenizer.to_json() == tok.to_json()


def test_the_cached_tokenizer_is_trusted_only_under_a_holding_checksum(exported: Path, tmp_path: Path) -> None:
    # another tokenizer in the cache, resealed: a file we wrote that way is believed (the checksum holds) ...
    other = Tokenizer.train(["x = 1\n", "y = 2\n"] * 30, 300)
    p = copy_with(
        exported, tmp_path / "other.gguf", drop=(TOKENIZER_JSON_KEY,), add={TOKENIZER_JSON_KEY: other.to_json()}
    )
    seal_gguf(p)
    assert load(p).tokenizer.to_json() == other.to_json()
    # ... a cache that is not a tokenizer is named ...
    p = copy_with(exported, tmp_path / "junk.gguf", drop=(TOKENIZER_JSON_KEY,), add={TOKENIZER_JSON_KEY: "{not json"})
    seal_gguf(p)
    with pytest.raises(GGUFError, match=f"{TOKENIZER_JSON_KEY} is not a valid tokenizer"):
        load(p)
    # ... and without a checksum (or when it fails) the arrays are what counts
    p = copy_with(
        exported,
        tmp_path / "unsealed.gguf",
        drop=(TOKENIZER_JSON_KEY, CHECKSUM_KEY),
        add={TOKENIZER_JSON_KEY: other.to_json()},
    )
    assert load(p).tokenizer.to_json() == _tokenizer_from_gguf(GGUFFile(exported)).to_json() != other.to_json()


# ----------------------------------------------------------------------------- lazy string arrays


def test_long_string_arrays_read_back_as_gguf_py_reads_them_and_are_bounds_checked(tmp_path: Path) -> None:
    n = LAZY_STRING_ARRAY + 13
    long = [f"tok{i}·é" if i % 7 else "" for i in range(n)]
    short = ["a", "bc"]
    path = tmp_path / "strings.gguf"
    w = gguf.GGUFWriter(str(path), "bitnet")
    w.add_array("test.long", long)
    w.add_array("test.short", short)
    w.add_uint32("test.after", 7)  # read after the lazy array: its end was found
    w.add_tensor("x", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = GGUFFile(path)
    assert r.fields.array_len("test.long") == n and r.fields.array_len("test.after") is None
    assert r.fields.array_len("missing") is None
    ref = gguf.GGUFReader(str(path))
    assert r.fields["test.long"] == list(ref.fields["test.long"].contents()) == long
    assert dict(r.fields.items())["test.short"] == short and r.fields.get("test.after") == 7
    assert np.array_equal(r.tensors[0].data, np.arange(8, dtype=np.float32))
    # a string length inside the lazy array pointing past the end fails at open, not on first access
    data = bytearray(path.read_bytes())
    at = data.index(b"tok100") - 8
    struct.pack_into("<Q", data, at, 2**40)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFFormatError, match="truncated string array"):
        GGUFFile(bad)


# ----------------------------------------------------------------------------- release after the engine is built


def test_release_pages_keeps_the_engine_and_the_file_views_intact(exported: Path, tok: Tokenizer) -> None:
    m = load(exported)
    ternary, dense = m.packed_weights()
    before = {k: (p.copy(), s) for k, (p, s) in ternary.items()}
    ids = tok.encode("def add(a, b):")
    eng = Engine(m, backend="rust", threads=1)  # builds from the packed weights, then releases them
    assert m.gguf is not None and m.gguf._ternary is None  # the packed copy was dropped once the engine had its own
    first = eng.rust.new_session(0).prefill(ids)
    m.release_pages()  # again: idempotent
    again = eng.rust.new_session(0).prefill(ids)
    assert np.array_equal(first, again)
    after, dense_after = m.packed_weights()  # repacked from the file's blocks
    assert after is not ternary and set(after) == set(before)
    for k, (p, s) in before.items():
        assert np.array_equal(after[k][0], p) and after[k][1] == s, k
    for k, a in dense.items():
        assert np.array_equal(dense_after[k], a), k
    # the torch model materialised after the release computes what the engine does
    tm = m.torch_model()
    with torch.no_grad():
        ref = tm(torch.tensor([ids]))[0, -1].numpy()
    assert np.abs(ref - first).max() <= 1e-3 * np.abs(ref).max()


# ----------------------------------------------------------------------------- one HF tokenizer for both encodes


def test_plain_and_special_encodes_share_one_tokenizer_across_threads_and_pickling(tok: Tokenizer) -> None:
    text = "<|bos|>def f():<|eos|> pass"
    plain, special = tok.encode(text), tok.encode(text, allow_special=True)
    assert tok.bos_id in special and tok.bos_id not in plain  # special-token text is text unless allowed
    assert tok.encode_batch([text, text], allow_special=True) == [special, special]
    assert tok.encode_batch([text]) == [plain]
    results: list[tuple[list[int], list[int]]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                results.append((tok.encode(text), tok.encode(text, allow_special=True)))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 200
    assert all(p == plain and s == special for p, s in results)
    assert tok.encode(text) == plain
    assert tok.raw.encode_special_tokens is False  # the flag is back to the special-aware default for raw's users
    assert tok.raw.encode(text, add_special_tokens=False).ids == special
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == plain and clone.encode(text, allow_special=True) == special


def test_a_load_leaves_the_garbage_collector_as_it_found_it(exported: Path, tmp_path: Path) -> None:
    """``read_gguf`` pauses the collector during a load (its allocations trigger collections that find nothing), and
    restores it after a good load and after a refused one, also when it was off to begin with."""
    import gc

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(exported.read_bytes()[:5000])
    assert gc.isenabled()
    load(exported)
    assert gc.isenabled()
    with pytest.raises(GGUFError):
        load(bad)
    assert gc.isenabled()
    gc.disable()
    try:
        load(exported)
        assert not gc.isenabled()
    finally:
        gc.enable()
