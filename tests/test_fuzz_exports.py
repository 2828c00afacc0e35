"""Seeded mutation fuzz of our own GGUF and safetensors exports (issue 14, "Done when").

A few hundred mutants of one tiny export of each format: byte flips in the header and in the tensor data,
truncations, and edits of header fields found with an independent walker of the GGUF layout (tensor types, data
offsets, dimensions, counts, string lengths, value types) or of the safetensors JSON header (dtypes, data offsets,
shapes, the stored config). Each mutant is loaded with ``nanochat.load`` in a child process, with a per-mutant alarm
and a wall-clock limit on the child, and for every mutant the test asserts one of:

- a clean error of the loader's type (``LoadError``, a ``ValueError``, whose message names the file);
- a load whose tensors equal the original's (and, for a file we wrote, whose config and tokenizer do too).

A hang fails on the alarm (or the child's limit), an abort on the child's exit status, naming the mutant.

GGUF mutants come twice: as they are (the content checksum catches what the structural checks let through) and,
for header edits, *resealed* (the checksum recomputed over the mutated file, as a buggy writer would leave it) so that
the structural checks are exercised on their own; a resealed mutant must still fail cleanly or load the original's
tensors.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nanochat.data.tokenizer import Tokenizer
from nanochat.export import export_gguf, export_safetensors
from nanochat.export.gguf_file import GGUFFile
from nanochat.export.gguf_io import CHECKSUM_EXCLUDED
from nanochat.export.names import CHECKSUM_KEY
from nanochat.model import GPT, GPTConfig

TEXTS = ["def add(a, b):\n    return a + b\n", "print('héllo wörld 🙂')\n", "class Foo:\n    pass\n"] * 40
SEED = 1412
PER_MUTANT_S = 20  # alarm per load in the child; a healthy load of these files takes milliseconds
CHILD_LIMIT_S = 300  # the whole child; the suite's budget is far below, this only turns a hang into a failure

# GGUF metadata value types: byte sizes of the scalars (gguf's GGUFValueType)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9


def gguf_layout(data: bytes) -> dict[str, Any]:
    """Where every header field of a (well-formed) GGUF file lies, read with plain ``struct``, independently of the
    package's reader: ``kvs`` (key, offsets of its length, value type, string lengths and array count), ``tensors``
    (name, offsets of its name length, n_dims, dims, type and data offset, its data offset), ``data_start``."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    off = 24
    kvs, fields = [], {}
    for _ in range(n_kv):
        rec: dict[str, Any] = {"len_off": off, "str_len_offs": []}
        (n,) = struct.unpack_from("<Q", data, off)
        rec["key"] = data[off + 8 : off + 8 + n].decode()
        off += 8 + n
        rec["type_off"] = off
        (vt,) = struct.unpack_from("<I", data, off)
        off += 4
        if vt in SCALAR_SIZES:
            fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[SCALAR_SIZES[vt]]
            fields[rec["key"]] = struct.unpack_from(fmt, data, off)[0]
            off += SCALAR_SIZES[vt]
        elif vt == STRING:
            rec["str_len_offs"].append(off)
            off += 8 + struct.unpack_from("<Q", data, off)[0]
        else:
            assert vt == ARRAY
            et, count = struct.unpack_from("<IQ", data, off)
            rec["count_off"] = off + 4
            off += 12
            for _ in range(count):
                if et == STRING:
                    rec["str_len_offs"].append(off)
                    off += 8 + struct.unpack_from("<Q", data, off)[0]
                else:
                    off += SCALAR_SIZES[et]
        kvs.append(rec)
    tensors = []
    for _ in range(n_tensors):
        rec = {"len_off": off}
        (n,) = struct.unpack_from("<Q", data, off)
        rec["name"] = data[off + 8 : off + 8 + n].decode()
        off += 8 + n
        rec["ndims_off"] = off
        (nd,) = struct.unpack_from("<I", data, off)
        rec["dims_offs"] = [off + 4 + 8 * i for i in range(nd)]
        off += 4 + 8 * nd
        rec["type_off"], rec["offset_off"] = off, off + 4
        rec["offset"] = struct.unpack_from("<Q", data, off + 4)[0]
        off += 12
        tensors.append(rec)
    align = fields.get("general.alignment", 32)
    return {"kvs": kvs, "tensors": tensors, "data_start": (off + align - 1) // align * align, "align": align}


def put(data: bytearray, off: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, data, off, value)


def reseal(data: bytes, span: tuple[int, int]) -> bytes | None:
    """``data`` with the checksum recomputed over it, written where the original's checksum value was (header edits
    move no bytes), or None when the mutant no longer parses far enough to be hashed."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(data)
        f.flush()
        try:
            r = GGUFFile(f.name)
        except Exception:
            return None
        if r.kv_spans.get(CHECKSUM_KEY, (None, None))[1] != span[1]:
            return None
        digest = r.content_digest(CHECKSUM_EXCLUDED).encode()
        del r
    out = bytearray(data)
    out[span[1] - len(digest) : span[1]] = digest  # the hex digest fills the value's last bytes
    return bytes(out)


def gguf_mutants(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """``(kind, bytes)`` mutants of one GGUF file: plain, and resealed copies of the header edits."""
    lay = gguf_layout(data)
    tensors, kvs, start = lay["tensors"], lay["kvs"], lay["data_start"]
    out: list[tuple[str, bytes]] = []

    def mutant(kind: str, edit: Any) -> None:
        b = bytearray(data)
        edit(b)
        if b != data:  # an edit that writes the value already there is no mutant
            out.append((kind, bytes(b)))

    for _ in range(50):
        i = rng.randrange(start)
        mutant("flip_header", lambda b, i=i: b.__setitem__(i, b[i] ^ rng.randrange(1, 256)))
    for _ in range(40):
        i = rng.randrange(start, len(data))
        mutant("flip_data", lambda b, i=i: b.__setitem__(i, b[i] ^ rng.randrange(1, 256)))
    for _ in range(12):
        out.append(("truncate", data[: rng.randrange(len(data))]))
    types = [0, 1, 30, 34, 35, 8, 2, 12, 39, 255, 2**31]
    for _ in range(25):
        t = rng.choice(tensors)
        mutant("tensor_type", lambda b, t=t: put(b, t["type_off"], "<I", rng.choice(types)))
    same_size = {0: [26], 1: [30, 25], 30: [1]}  # F32 -> I32, F16 -> BF16/I16, BF16 -> F16: the layout still holds
    floats = [t for t in tensors if struct.unpack_from("<I", data, t["type_off"])[0] in same_size]
    for t in rng.sample(floats, min(12, len(floats))):
        ty = rng.choice(same_size[struct.unpack_from("<I", data, t["type_off"])[0]])
        mutant("tensor_type_same_size", lambda b, t=t, ty=ty: put(b, t["type_off"], "<I", ty))
    for _ in range(25):
        t, other = rng.choice(tensors), rng.choice(tensors)
        v = rng.choice([other["offset"], t["offset"] + lay["align"], max(t["offset"] - lay["align"], 0), 2**63, 1])
        mutant("tensor_offset", lambda b, t=t, v=v: put(b, t["offset_off"], "<Q", v))
    for _ in range(15):
        t = rng.choice(tensors)
        d_off = rng.choice(t["dims_offs"])
        d = struct.unpack_from("<Q", data, d_off)[0]
        v = rng.choice([d * 2, d - 1, d + 256, 0, 2**40, 2**64 - 1])
        mutant("tensor_dim", lambda b, o=d_off, v=v: put(b, o, "<Q", v % 2**64))
    for _ in range(8):
        t = rng.choice(tensors)
        mutant("tensor_ndims", lambda b, t=t: put(b, t["ndims_off"], "<I", rng.choice([0, 1, 3, 9, 2**32 - 1])))
    counts = [8, 16] + [k["count_off"] for k in kvs if "count_off" in k]
    for _ in range(15):
        o = rng.choice(counts)
        v = struct.unpack_from("<Q", data, o)[0]
        mutant("count", lambda b, o=o, v=v: put(b, o, "<Q", max(0, v + rng.choice([-1, 1, v, -v // 2]))))
    lens = [k["len_off"] for k in kvs] + [t["len_off"] for t in tensors]
    lens += [o for k in kvs for o in k["str_len_offs"][:20]]
    for _ in range(20):
        o = rng.choice(lens)
        v = struct.unpack_from("<Q", data, o)[0]
        mutant("string_len", lambda b, o=o, v=v: put(b, o, "<Q", rng.choice([v + 1, max(v - 1, 0), 0, 2**40])))
    for _ in range(15):
        k = rng.choice(kvs)
        mutant("kv_type", lambda b, k=k: put(b, k["type_off"], "<I", rng.choice([*range(13), 99])))

    span_rec = next(k for k in kvs if k["key"] == CHECKSUM_KEY)
    span = (
        span_rec["len_off"],
        span_rec["str_len_offs"][0] + 8 + struct.unpack_from("<Q", data, span_rec["str_len_offs"][0])[0],
    )
    structural = [(k, m) for k, m in out if k not in ("flip_data", "truncate")]
    resealed = []
    for kind, m in structural:  # those that still parse: the checks behind the checksum, on their own
        r = reseal(m, span)
        if r is not None and r != data:
            resealed.append((f"resealed_{kind}", r))
    return out + resealed


def st_mutants(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """``(kind, bytes)`` mutants of one safetensors file: flips, truncations, and JSON header edits re-serialised
    with a consistent header length (dtypes, data offsets, shapes, the stored config, the checksum removed)."""
    (n,) = struct.unpack_from("<Q", data, 0)
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    names = sorted(k for k in header if k != "__metadata__")
    out: list[tuple[str, bytes]] = []
    for _ in range(30):
        i = rng.randrange(8, 8 + n)
        b = bytearray(data)
        b[i] ^= rng.randrange(1, 256)
        out.append(("flip_header", bytes(b)))
    for _ in range(25):
        i = rng.randrange(8 + n, len(data))
        b = bytearray(data)
        b[i] ^= rng.randrange(1, 256)
        out.append(("flip_data", bytes(b)))
    for _ in range(10):
        out.append(("truncate", data[: rng.randrange(len(data))]))
    for v in (n - 1, n + 1, n + 8, 2**40, 0, 7):
        out.append(("header_len", struct.pack("<Q", v) + data[8:]))

    def edited(kind: str, edit: Any) -> None:
        h = json.loads(json.dumps(header))
        edit(h)
        raw = json.dumps(h, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        out.append((kind, struct.pack("<Q", len(raw)) + raw + body))

    for _ in range(10):
        name, dt = rng.choice(names), rng.choice(["F16", "BF16", "I32", "U8", "F64", "F32"])
        edited("dtype", lambda h, name=name, dt=dt: h[name].__setitem__("dtype", dt))
    for _ in range(10):
        a, b2 = rng.sample(names, 2)
        edited("offsets_swap", lambda h, a=a, b2=b2: h[a].__setitem__("data_offsets", h[b2]["data_offsets"]))
    for _ in range(5):
        name, delta = rng.choice(names), rng.choice([4, -4, 8])
        edited(
            "offsets_shift",
            lambda h, name=name, delta=delta: h[name].__setitem__(
                "data_offsets", [o + delta for o in h[name]["data_offsets"]]
            ),
        )
    for _ in range(8):
        name = rng.choice(names)
        edited("shape", lambda h, name=name: h[name].__setitem__("shape", list(reversed(h[name]["shape"])) + [1]))
    for key, val in (("n_layer", 3), ("n_layer", 1), ("norm_eps", 1e-3), ("rope_theta", 500.0), ("n_head", 4)):

        def cfg_edit(h: dict, key: str = key, val: Any = val) -> None:
            cfg = json.loads(h["__metadata__"]["nanochat.config"])
            cfg[key] = val
            h["__metadata__"]["nanochat.config"] = json.dumps(cfg)

        edited(f"config_{key}", cfg_edit)
    edited("no_checksum", lambda h: h["__metadata__"].pop(CHECKSUM_KEY))
    return out


CHILD = r"""
import hashlib, json, signal, sys
import numpy as np
from nanochat.export import LoadError, load

def digests(m):
    t = hashlib.sha256()
    if m.gguf is not None:
        for k in sorted(m.gguf.ternary):
            p, s = m.gguf.ternary[k]
            t.update(k.encode() + np.ascontiguousarray(p).tobytes() + repr(float(s)).encode())
        for k in sorted(m.gguf.dense):
            t.update(k.encode() + np.ascontiguousarray(m.gguf.dense[k], dtype=np.float32).tobytes())
    else:
        sd = m.torch_model().state_dict()
        for k in sorted(sd):
            t.update(k.encode() + sd[k].detach().float().contiguous().numpy().tobytes())
    cfg = hashlib.sha256(json.dumps(m.config.to_dict(), sort_keys=True).encode()).hexdigest()
    tok = hashlib.sha256(m.tokenizer.to_json().encode()).hexdigest()
    return t.hexdigest(), cfg, tok

def alarm(signum, frame):
    raise TimeoutError("hang")

signal.signal(signal.SIGALRM, alarm)
for line in open(sys.argv[1]):
    job = json.loads(line)
    print(json.dumps({"i": job["i"], "started": True}), flush=True)
    signal.alarm(int(sys.argv[2]))
    try:
        m = load(job["path"])
        tensors, cfg, tok = digests(m)
        out = {"i": job["i"], "ok": True, "tensors": tensors, "config": cfg, "tokenizer": tok}
    except TimeoutError:
        out = {"i": job["i"], "ok": False, "type": "hang", "load_error": False, "msg": "no result in time"}
    except Exception as e:
        out = {"i": job["i"], "ok": False, "type": type(e).__name__, "load_error": isinstance(e, LoadError),
               "msg": str(e)[:300]}
    signal.alarm(0)
    print(json.dumps(out), flush=True)
"""


def start_child(tmp_path: Path, tag: str, paths: list[Path]) -> tuple[subprocess.Popen, Path]:
    jobs = tmp_path / f"{tag}.jobs"
    jobs.write_text("".join(json.dumps({"i": i, "path": str(p)}) + "\n" for i, p in enumerate(paths)))
    out = tmp_path / f"{tag}.out"
    with open(out, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(jobs), str(PER_MUTANT_S)], stdout=f, stderr=subprocess.STDOUT
        )
    return proc, out


def finish_child(proc: subprocess.Popen, out: Path, kinds: list[str]) -> list[dict[str, Any]]:
    try:
        proc.wait(timeout=CHILD_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.startswith("{")]
    results = [r for r in lines if "started" not in r]
    if proc.returncode != 0 or len(results) != len(kinds):
        last = max((r["i"] for r in lines), default=None)
        tail = out.read_text()[-1500:]
        pytest.fail(
            f"the loading child ended with status {proc.returncode} after {len(results)} of {len(kinds)} mutants; "
            f"last started: {last} ({kinds[last] if last is not None else '-'}): an abort or a hang\n{tail}"
        )
    return results


def check(results: list[dict[str, Any]], kinds: list[str], paths: list[Path]) -> dict[str, int]:
    """Every mutant either failed with a LoadError naming its file, or loaded the original (index 0)."""
    ref = results[0]
    assert ref["ok"], ref
    tally: dict[str, int] = {"error": 0, "equal": 0}
    problems = []
    for r, kind, p in zip(results[1:], kinds[1:], paths[1:], strict=True):
        where = f"mutant {r['i']} ({kind}, {p.name})"
        if not r["ok"]:
            if r["type"] == "hang":
                problems.append(f"{where}: the load hung")
            elif not r["load_error"]:
                problems.append(f"{where}: {r['type']}: {r['msg']}")
            elif str(p) not in r["msg"]:
                problems.append(f"{where}: the message does not name the file: {r['msg']}")
            tally["error"] += 1
        elif r["tensors"] != ref["tensors"]:
            problems.append(f"{where}: loaded with different tensors")
        elif not kind.startswith("resealed_") and (r["config"], r["tokenizer"]) != (ref["config"], ref["tokenizer"]):
            problems.append(f"{where}: loaded a different config or tokenizer")  # our file: the original or an error
        else:
            tally["equal"] += 1
    assert not problems, f"{len(problems)} bad mutant(s):\n" + "\n".join(problems[:30])
    return tally


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, 300)


def tiny(n_embd: int, residual: str, quant: str = "ternary") -> GPT:
    cfg = GPTConfig(
        vocab_size=320, seq_len=32, n_layer=2, n_embd=n_embd, n_head=2, n_kv_head=1, mlp_hidden=n_embd,
        residual=residual, qk_norm=residual != "standard", quant=quant,
    )  # fmt: skip
    torch.manual_seed(0)
    m = GPT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def write_all(tmp_path: Path, tag: str, original: Path, mutants: list[tuple[str, bytes]]) -> tuple[list, list]:
    paths, kinds = [original], ["original"]
    for i, (kind, data) in enumerate(mutants):
        p = tmp_path / f"{tag}_{i:03d}_{kind}{original.suffix}"
        p.write_bytes(data)
        paths.append(p)
        kinds.append(kind)
    return paths, kinds


def test_mutants_of_our_exports_fail_cleanly_or_load_the_original(tmp_path, tok):
    rng = random.Random(SEED)
    gguf_path = export_gguf(tiny(256, "standard"), tok, tmp_path / "m.gguf")
    st_path = export_safetensors(tiny(64, "mhc_lite", quant="fp"), tok, tmp_path / "m.safetensors")
    g_paths, g_kinds = write_all(tmp_path, "g", gguf_path, gguf_mutants(gguf_path.read_bytes(), rng))
    s_paths, s_kinds = write_all(tmp_path, "s", st_path, st_mutants(st_path.read_bytes(), rng))
    assert len(g_paths) + len(s_paths) >= 300
    g_proc, g_out = start_child(tmp_path, "gguf", g_paths)  # the two formats load side by side
    s_proc, s_out = start_child(tmp_path, "st", s_paths)
    g_tally = check(finish_child(g_proc, g_out, g_kinds), g_kinds, g_paths)
    s_tally = check(finish_child(s_proc, s_out, s_kinds), s_kinds, s_paths)
    # nearly every mutant of a file we wrote is an error; the few that load changed bytes nobody reads (padding, or
    # the checksum key's own name)
    assert g_tally["error"] >= 0.8 * (len(g_paths) - 1), g_tally
    assert s_tally["error"] >= 0.8 * (len(s_paths) - 1), s_tally
    for p in g_paths[1:] + s_paths[1:]:  # ~150 MB of mutants; kept when the test fails, to look at
        p.unlink()
