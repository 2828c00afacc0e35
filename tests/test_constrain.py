"""JSON-constrained decoding (nanochat.engine.constrain) against ``json.loads`` as the independent reference.

A string is a valid JSON prefix iff some completion parses. Valid verdicts are proven by a witness (the validator's
own ``closing()`` appended must parse); invalid verdicts are checked against a bank of completions (none may parse),
and ``complete`` must agree with ``json.loads`` on every string."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import numpy as np
import pytest

from nanochat.engine.constrain import (
    JsonChooser,
    JsonPrefix,
    SchemaError,
    SchemaPrefix,
    TokenTable,
    compile_schema,
    is_json_prefix,
)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; RFC 8259 does not


def parses(s: str) -> bool:
    try:
        json.loads(s, parse_constant=_no_constants)
    except ValueError:
        return False
    return True


PIECES = ["", "0", "1", '"', "}", "]", ":0", '":0', "e0", ".0", "ue", "rue", "alse", "ull", "ll", "l", "n", "0000"]
CLOSERS = ["", "}", "]", "}}", "]]", "}]", "]}", "]}]", "}]}", "]]]", "}}}"]
BANK = sorted({a + b + c for a in PIECES for b in ["", '":0'] for c in CLOSERS})

VALID = [
    "", " ", "{", '{"', '{"a', '{"a"', '{"a":', '{"a": [', '{"a": [1', '{"a": [1,', '{"a": [1, 2.', '{"a": [1, 2.5e',
    '{"a": [1, 2.5e-', '{"a": [1, 2.5e-3]', '{"a": [1, 2.5e-3]}', '["\\', '["\\u', '["\\u00e', '"\\u00e9"', "-",
    "-0", "-0.", "0e+", "tr", "fals", "nul", "[[[[", "[{}, []", '{"k": "v\\n', '"\u00e9\u4e2d', "[\n\t1\r\n", "123 ",
]  # fmt: skip
INVALID = [
    "}", "]", "{,", "[1,]", "01", "-a", '{"a" 1', "{1", "tru e", "1.e", "{}}", '"\\x', "[1 2", "[,", '{"a":}',
    "--1", "1..", "1e+-", '"\u0001', "nulll", "truex", "[]]", '{"a":1,}', "[1]2", "+1", ".5", '"\\u12g', "[{]",
]  # fmt: skip


@pytest.mark.parametrize("s", VALID)
def test_valid_prefixes_have_a_completion(s: str) -> None:
    st = JsonPrefix().advance(s.encode())
    assert st is not None, s
    assert parses(s + st.closing()), (s, st.closing())
    assert st.complete == parses(s)


@pytest.mark.parametrize("s", INVALID)
def test_invalid_prefixes_have_none(s: str) -> None:
    assert not is_json_prefix(s)
    assert not any(parses(s + c) for c in BANK), s


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.randint(-(10**6), 10**6)
    if kind == 2:
        return rng.choice([0.0, -1.5, 3.25e-7, 1e300, -2.5e12, rng.random()])
    if kind in (3, 4):
        alphabet = 'ab "\\/\n\t\u00e9\u4e2d\U0001f600\u0001'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
    if kind in (5, 6):
        return {str(random_value(rng, 9)): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def test_every_truncation_of_json_dumps_is_a_valid_prefix() -> None:
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        value = random_value(rng)
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1, "\t"]))
        for i in range(len(text) + 1):
            s = text[:i]
            st = JsonPrefix().advance(s.encode("utf-8", "surrogatepass"))
            assert st is not None, s
            assert st.complete == parses(s), s
            assert parses(s + st.closing()), (s, st.closing())
            checked += 1
    assert checked > 5000


def test_random_strings_agree_with_json_loads() -> None:
    """Short strings over JSON's alphabet: valid ones are proven by their closing, invalid ones (and the first byte
    that made them so) have no completion in the bank, and ``complete`` is ``json.loads`` succeeding."""
    rng = random.Random(1)
    alphabet = list('{}[]":,0123-.eE+ tfnrulas\\')
    seen = {"valid": 0, "invalid": 0}
    for _ in range(1000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 8)))
        st = JsonPrefix().advance(s.encode())
        if st is not None:
            seen["valid"] += 1
            assert parses(s + st.closing()), (s, st.closing())
            assert st.complete == parses(s), s
        else:
            seen["invalid"] += 1
            k = next(i for i in range(len(s) + 1) if not is_json_prefix(s[:i]))
            assert k > 0 and is_json_prefix(s[: k - 1])
            assert not parses(s)
            assert not any(parses(s[:k] + c) for c in BANK), s[:k]
    assert min(seen.values()) > 100, seen


def test_exhaustive_short_strings() -> None:
    """Every string of up to 3 characters over a small alphabet: the verdict matches a completion search."""
    alphabet = '{}[]":,0e '
    for n in range(4):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            st = JsonPrefix().advance(s.encode())
            witness = st is not None and parses(s + st.closing())
            assert witness == any(parses(s + c) for c in BANK), s


def test_object_only() -> None:
    assert is_json_prefix(" {", object_only=True)
    assert not is_json_prefix("[", object_only=True)
    assert not is_json_prefix("1", object_only=True)
    assert JsonPrefix(object_only=True).closing() == "{}"
    assert is_json_prefix('{"a": [1]}', object_only=True)


# --------------------------------------------------------------------------- the chooser


VOCAB = ["<special>", *(chr(b) for b in range(32, 127)), "\n", '{"', '":', '"}', ', "', "true", "nul", "l", "12",
         ".5", "e-", "\\u00", "\u00e9", "\u4e2d", "xyz", "}}", "]]", '"]', "  ", "\xa0"]  # fmt: skip
BYTE_TOKENS = [v.encode() for v in VOCAB]


def encode(text: str) -> list[int]:
    """Byte by byte over the single-byte tokens (every closing text is ASCII)."""
    return [BYTE_TOKENS.index(bytes([b])) for b in text.encode()]


def run_chooser(seed: int, budget: int, temperature: float, bias: np.ndarray | None = None) -> tuple[str, int]:
    table = TokenTable(len(VOCAB), lambda i: b"" if i == 0 else BYTE_TOKENS[i])
    chooser = JsonChooser(table, encode)
    gen = np.random.default_rng(seed)
    out = b""
    n = 0
    while n < budget and not chooser.complete:
        logits = gen.standard_normal(len(VOCAB)).astype(np.float32) * 3
        if bias is not None:
            logits += bias
        tok = chooser.choose(logits, temperature, None, 0.9 if seed % 2 else None, gen, budget - n)
        assert tok != 0
        out += BYTE_TOKENS[tok]
        n += 1
        assert is_json_prefix(out, object_only=True), out
    return out.decode("utf-8", "replace"), n


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.5])
def test_chooser_always_ends_in_a_json_object(temperature: float) -> None:
    for seed in range(40):
        budget = random.Random(seed).choice([2, 3, 5, 8, 20, 60])
        text, n = run_chooser(seed, budget, temperature)
        assert n <= budget
        assert isinstance(json.loads(text, parse_constant=_no_constants), dict), text


def test_chooser_when_the_likeliest_tokens_are_all_invalid() -> None:
    """The model insists on junk ("xyz" and letters): the fallback over the whole vocabulary still builds JSON."""
    bias = np.zeros(len(VOCAB), dtype=np.float32)
    bias[VOCAB.index("xyz")] = 50.0
    for c in "qwxz":
        bias[VOCAB.index(c)] = 40.0
    for seed in range(5):
        text, _ = run_chooser(seed, 30, 0.0, bias)
        assert isinstance(json.loads(text), dict)


def test_chooser_refuses_a_budget_too_small() -> None:
    table = TokenTable(len(VOCAB), lambda i: b"" if i == 0 else BYTE_TOKENS[i])
    chooser = JsonChooser(table, encode)
    with pytest.raises(ValueError, match="max_tokens"):
        chooser.choose(np.zeros(len(VOCAB), dtype=np.float32), 0.0, None, None, None, 1)  # "{}" needs two byte tokens


def test_whitespace_policy_for_generation() -> None:
    """``max_ws`` narrows JSON for generation only: no leading blank, bounded blank runs, strings untouched."""
    assert JsonPrefix(max_ws=3).advance(b" {") is None
    assert JsonPrefix(max_ws=3).advance(b"{   }") is not None
    assert JsonPrefix(max_ws=3).advance(b"{    }") is None
    assert JsonPrefix(max_ws=3).advance(b'{"a      b" \n:\t[1,  2 ]}') is not None
    assert JsonPrefix().advance(b"  \n\n\n\n {\n\n\n\n\n }") is not None  # plain JSON has no such limit


def test_chooser_output_for_a_whitespace_loving_model() -> None:
    bias = np.zeros(len(VOCAB), dtype=np.float32)
    for c in [" ", "\n", "  "]:
        bias[VOCAB.index(c)] = 30.0
    text, n = run_chooser(0, 60, 0.0, bias)
    assert isinstance(json.loads(text), dict) and not text[0].isspace()
    blanks = text.split('"')[0]  # outside any string (inside one, spaces are content)
    assert len(blanks) > 16  # the model's whitespace was used, in runs of at most 16
    assert not any(set(blanks[i : i + 17]) <= set(" \t\n\r") for i in range(len(blanks) - 16))


# --------------------------------------------------------------------------- json_schema (the supported subset)


PERSON = {
    "type": "object",
    "title": "a person",
    "properties": {
        "name": {"type": "string", "description": "full name"},
        "age": {"type": "integer"},
        "height": {"type": "number"},
        "member": {"type": "boolean"},
        "note": {"type": "null"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city"],
        },  # fmt: skip
        "empty": {"type": "object", "properties": {}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PY_TYPES: dict[str, Any] = {"string": str, "number": (int, float), "integer": int, "boolean": bool}


def conforms(value: Any, schema: dict[str, Any]) -> bool:
    """A plain checker of the supported subset (the independent reference)."""
    kind = schema["type"]
    if kind == "null":
        return value is None
    if kind == "object":
        props = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and set(schema.get("required", [])) <= set(value)
            and set(value) <= set(props)
            and all(conforms(v, props[k]) for k, v in value.items())
        )
    return isinstance(value, PY_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))


def random_person(rng: random.Random) -> dict[str, Any]:
    return {
        "name": "".join(rng.choice('ab "\\\u00e9\n') for _ in range(rng.randrange(5))),
        "age": rng.randint(-5, 10**6),
        "height": rng.choice([0, -1, 1.75, 2.5e-3, 1e21]),
        "member": rng.random() < 0.5,
        "note": None,
        "address": {"city": rng.choice(["", "Paris", "K\u00f8benhavn"]), "zip": rng.randint(0, 99999)},
        "empty": {},
    }


def _deep(n: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "null"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_schema_compiles_to_literals_and_slots() -> None:
    prog = compile_schema(PERSON)
    assert prog[0] == b'{"name":' and prog[1] == "string" and prog[-1] == b'},"empty":{}}'
    default = SchemaPrefix(prog).closing()
    assert conforms(json.loads(default), PERSON), default


@pytest.mark.parametrize(
    ("schema", "what"),
    [
        ({"type": "array", "items": {"type": "string"}}, "array"),
        ({"type": "object", "properties": {"a": {"type": "string", "enum": ["x"]}}}, "enum"),
        ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
        ({"type": "object", "anyOf": []}, "anyOf"),
        ({"type": "object", "properties": {"a": {"$ref": "#/x"}}}, "None"),
        ([], "must be an object"),
        (_deep(20), "deeper than 16"),
    ],
)
def test_unsupported_schemas_are_refused_by_name(schema: Any, what: str) -> None:
    with pytest.raises(SchemaError, match=what.replace("$", "\\$")):
        compile_schema(schema)


def test_schema_prefixes_against_conforming_documents() -> None:
    """Every truncation of a conforming compact document is accepted and closes into a conforming document; a
    document that breaks the schema is rejected at the byte that breaks it."""
    prog = compile_schema(PERSON)
    rng = random.Random(3)
    for _ in range(60):
        doc = json.dumps(random_person(rng), ensure_ascii=rng.random() < 0.5, separators=(",", ":")).encode()
        for i in range(len(doc) + 1):
            st = SchemaPrefix(prog).advance(doc[:i])
            assert st is not None, doc[:i]
            closed = json.loads(doc[:i].decode("utf-8", "replace") + st.closing())
            assert conforms(closed, PERSON), closed
        assert st is not None and st.complete
    for bad in [b'{"age":', b'{"name":1', b'{"name":"","age":1.5', b'{"name":"","age":2e3', b'{"name": ""',
                b'{"name":"","age":1,"height":true', b'{"name":"","age":1,"height":1,"member":null']:  # fmt: skip
        assert SchemaPrefix(prog).advance(bad) is None, bad


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chooser_with_a_schema_writes_conforming_documents(temperature: float) -> None:
    table = TokenTable(len(VOCAB), lambda i: b"" if i == 0 else BYTE_TOKENS[i])
    prog = compile_schema(PERSON)
    for seed in range(30):
        budget = len(encode(SchemaPrefix(prog).closing())) + seed * 3
        chooser = JsonChooser(table, encode, schema=prog)
        gen = np.random.default_rng(seed)
        out, n = b"", 0
        while n < budget and not chooser.complete:
            tok = chooser.choose(
                gen.standard_normal(len(VOCAB)).astype(np.float32) * 3, temperature, None, None, gen, budget - n
            )
            out, n = out + BYTE_TOKENS[tok], n + 1
        value = json.loads(out.decode("utf-8", "replace"))
        assert conforms(value, PERSON), out
