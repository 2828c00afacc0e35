"""Synthetic code tasks: small, correct Python functions with docstrings and asserts, from templates.

Notable choices:
- A few dozen templates (add, max, reverse, fib, is_prime, count_vowels, clamp, gcd, merge, ...), each with
  randomised function/parameter names, constants, body style (loop or builtin) and test style (bare asserts
  or a ``test_`` function), deterministic from a seed.
- The expected values in the asserts come from a separate Python reference of each template, not from
  the generated body, so a wrong body would fail when executed; the tests execute thousands of them.
- Documents are tagged ``synthetic/<seed>/<index>.py`` so the train/val hash split applies to them too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nanochat.data.corpus import Document

_WORDS = (
    "apple", "banana", "cherry", "delta", "echo", "falcon", "garden", "harbor", "island", "jungle", "kernel",
    "lemon", "mango", "nectar", "orbit", "pepper", "quartz", "river", "sunset", "tiger", "umbrella", "violet",
    "walnut", "xenon", "yellow", "zebra", "python", "rust", "level", "radar", "noon", "stats", "token", "model",
)  # fmt: skip
_INT_NAMES = ("n", "x", "k", "value", "num", "count", "a", "b", "m", "i")
_LIST_NAMES = ("xs", "items", "values", "nums", "numbers", "data", "arr", "seq")
_STR_NAMES = ("s", "text", "word", "string", "line", "name")


def _pick(r: random.Random, options: Sequence[str]) -> str:
    return options[r.randrange(len(options))]


def _ints(r: random.Random, lo: int = -20, hi: int = 50, n_lo: int = 1, n_hi: int = 7) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(n_lo, n_hi))]


def _word(r: random.Random) -> str:
    return _pick(r, _WORDS)


def _sentence(r: random.Random) -> str:
    return " ".join(_word(r) for _ in range(r.randint(1, 5)))


@dataclass(frozen=True)
class _Task:
    """One template instance: ``def name(params) -> ret`` with a docstring, body lines, and test inputs."""

    name: str
    params: str  # e.g. "xs: list[int]"
    ret: str
    doc: str
    body: str  # indented by 4 spaces per line already stripped; re-indented on render
    ref: Callable[..., Any]
    cases: list[tuple[Any, ...]]

    def render(self, r: random.Random) -> str:
        body = "\n".join("    " + line if line else "" for line in self.body.strip("\n").split("\n"))
        lines = [f"def {self.name}({self.params}) -> {self.ret}:", f'    """{self.doc}"""', body, ""]
        if r.random() < 0.5:
            lines.append("")
            lines.extend(
                f"assert {self.name}({', '.join(repr(a) for a in args)}) == {self.ref(*args)!r}" for args in self.cases
            )
        else:
            lines.append("")
            lines.append(f"def test_{self.name}() -> None:")
            lines.extend(
                f"    assert {self.name}({', '.join(repr(a) for a in args)}) == {self.ref(*args)!r}"
                for args in self.cases
            )
            lines.append("")
            lines.append("")
            lines.append(f"test_{self.name}()")
        return "\n".join(lines) + "\n"


def _cases(r: random.Random, gen: Callable[[random.Random], tuple[Any, ...]], k: int = 3) -> list[tuple[Any, ...]]:
    return [gen(r) for _ in range(k)]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return abs(a)


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _fact(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out


def _merge(a: list[int], b: list[int]) -> list[int]:
    return sorted(a + b)


def _fizz(i: int) -> str:
    return "FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i)


def _tpl_add(r: random.Random) -> _Task:
    a, b = r.sample(_INT_NAMES[:6], 2)
    name = _pick(r, ("add", "add_numbers", "plus", "sum_two", "add_ints"))
    return _Task(name, f"{a}: int, {b}: int", "int", f"Return the sum of {a} and {b}.", f"return {a} + {b}",
                 lambda x, y: x + y, _cases(r, lambda r: (r.randint(-99, 99), r.randint(-99, 99))))  # fmt: skip


def _tpl_sub(r: random.Random) -> _Task:
    a, b = r.sample(_INT_NAMES[:6], 2)
    name = _pick(r, ("subtract", "minus", "difference", "sub"))
    return _Task(name, f"{a}: int, {b}: int", "int", f"Return {a} minus {b}.", f"return {a} - {b}",
                 lambda x, y: x - y, _cases(r, lambda r: (r.randint(-99, 99), r.randint(-99, 99))))  # fmt: skip


def _tpl_scale(r: random.Random) -> _Task:
    k = r.randint(2, 12)
    v = _pick(r, _INT_NAMES)
    name = _pick(r, (f"times_{k}", f"multiply_by_{k}", f"scale_{k}"))
    return _Task(name, f"{v}: int", "int", f"Multiply {v} by {k}.", f"return {v} * {k}",
                 lambda x: x * k, _cases(r, lambda r: (r.randint(-50, 50),)))  # fmt: skip


def _tpl_offset(r: random.Random) -> _Task:
    k = r.randint(1, 100)
    v = _pick(r, _INT_NAMES)
    name = _pick(r, (f"add_{k}", f"plus_{k}", f"increment_by_{k}"))
    return _Task(name, f"{v}: int", "int", f"Return {v} increased by {k}.", f"return {v} + {k}",
                 lambda x: x + k, _cases(r, lambda r: (r.randint(-50, 50),)))  # fmt: skip


def _tpl_max(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("find_max", "maximum", "largest", "max_value", "get_max"))
    body = _pick(r, (
        f"best = {xs}[0]\nfor x in {xs}[1:]:\n    if x > best:\n        best = x\nreturn best",
        f"return max({xs})",
        f"result = {xs}[0]\nfor item in {xs}:\n    result = item if item > result else result\nreturn result",
    ))  # fmt: skip
    return _Task(name, f"{xs}: list[int]", "int", "Return the largest element of a non-empty list.", body,
                 lambda a: max(a), _cases(r, lambda r: (_ints(r),)))  # fmt: skip


def _tpl_min(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("find_min", "minimum", "smallest", "min_value"))
    body = _pick(r, (
        f"best = {xs}[0]\nfor x in {xs}[1:]:\n    if x < best:\n        best = x\nreturn best",
        f"return min({xs})",
    ))  # fmt: skip
    return _Task(name, f"{xs}: list[int]", "int", "Return the smallest element of a non-empty list.", body,
                 lambda a: min(a), _cases(r, lambda r: (_ints(r),)))  # fmt: skip


def _tpl_sum(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("total", "sum_list", "list_sum", "add_all"))
    body = _pick(r, (f"total = 0\nfor x in {xs}:\n    total += x\nreturn total", f"return sum({xs})"))
    return _Task(name, f"{xs}: list[int]", "int", "Return the sum of the numbers in the list.", body,
                 lambda a: sum(a), _cases(r, lambda r: (_ints(r, n_lo=0),)))  # fmt: skip


def _tpl_mean(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("mean", "average", "avg"))
    return _Task(name, f"{xs}: list[int]", "float", "Return the arithmetic mean of a non-empty list.",
                 f"return sum({xs}) / len({xs})", lambda a: sum(a) / len(a),
                 _cases(r, lambda r: (_ints(r, n_hi=5),)))  # fmt: skip


def _tpl_reverse_str(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("reverse", "reverse_string", "reversed_text", "backwards"))
    body = _pick(r, (
        f"return {s}[::-1]",
        f"out = ''\nfor ch in {s}:\n    out = ch + out\nreturn out",
        f"return ''.join(reversed({s}))",
    ))  # fmt: skip
    return _Task(name, f"{s}: str", "str", f"Return {s} reversed.", body, lambda t: t[::-1],
                 _cases(r, lambda r: (_word(r),)))  # fmt: skip


def _tpl_reverse_list(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("reverse_list", "reversed_items", "flip"))
    body = _pick(r, (f"return {xs}[::-1]", f"out = []\nfor x in {xs}:\n    out.insert(0, x)\nreturn out"))
    return _Task(name, f"{xs}: list[int]", "list[int]", "Return a new list with the elements in reverse order.",
                 body, lambda a: a[::-1], _cases(r, lambda r: (_ints(r, n_lo=0),)))  # fmt: skip


def _tpl_fib(r: random.Random) -> _Task:
    v = _pick(r, ("n", "k", "index"))
    name = _pick(r, ("fib", "fibonacci", "nth_fibonacci"))
    body = _pick(r, (
        f"a, b = 0, 1\nfor _ in range({v}):\n    a, b = b, a + b\nreturn a",
        f"if {v} < 2:\n    return {v}\nprev, cur = 0, 1\nfor _ in range({v} - 1):\n    prev, cur = cur, prev + cur\nreturn cur",
    ))  # fmt: skip
    return _Task(name, f"{v}: int", "int", f"Return the {v}-th Fibonacci number (fib(0) == 0).", body, _fib,
                 _cases(r, lambda r: (r.randint(0, 30),)))  # fmt: skip


def _tpl_fact(r: random.Random) -> _Task:
    v = _pick(r, ("n", "k", "num"))
    name = _pick(r, ("factorial", "fact"))
    body = _pick(r, (
        f"result = 1\nfor i in range(2, {v} + 1):\n    result *= i\nreturn result",
        f"if {v} <= 1:\n    return 1\nreturn {v} * {name}({v} - 1)",
    ))  # fmt: skip
    return _Task(name, f"{v}: int", "int", f"Return {v}! for a non-negative integer {v}.", body, _fact,
                 _cases(r, lambda r: (r.randint(0, 12),)))  # fmt: skip


def _tpl_is_prime(r: random.Random) -> _Task:
    v = _pick(r, ("n", "num", "candidate"))
    name = _pick(r, ("is_prime", "check_prime", "prime"))
    body = _pick(r, (
        f"if {v} < 2:\n    return False\ni = 2\nwhile i * i <= {v}:\n    if {v} % i == 0:\n        return False\n    i += 1\nreturn True",
        f"if {v} < 2:\n    return False\nreturn all({v} % d != 0 for d in range(2, int({v} ** 0.5) + 1))",
    ))  # fmt: skip
    return _Task(name, f"{v}: int", "bool", f"Return True if {v} is a prime number.", body, _is_prime,
                 _cases(r, lambda r: (r.randint(-3, 200),), k=4))  # fmt: skip


def _tpl_count_vowels(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("count_vowels", "vowel_count", "num_vowels"))
    body = _pick(r, (
        f"return sum(1 for ch in {s}.lower() if ch in 'aeiou')",
        f"count = 0\nfor ch in {s}.lower():\n    if ch in 'aeiou':\n        count += 1\nreturn count",
    ))  # fmt: skip
    return _Task(name, f"{s}: str", "int", f"Count the vowels (a, e, i, o, u) in {s}.", body,
                 lambda t: sum(1 for ch in t.lower() if ch in "aeiou"), _cases(r, lambda r: (_sentence(r),)))  # fmt: skip


def _tpl_clamp(r: random.Random) -> _Task:
    lo = r.randint(-20, 10)
    hi = lo + r.randint(1, 40)
    v = _pick(r, _INT_NAMES)
    name = _pick(r, ("clamp", "clip", "bound", "limit"))
    body = _pick(r, (f"return max({lo}, min({hi}, {v}))",
                     f"if {v} < {lo}:\n    return {lo}\nif {v} > {hi}:\n    return {hi}\nreturn {v}"))  # fmt: skip
    return _Task(name, f"{v}: int", "int", f"Clamp {v} to the range [{lo}, {hi}].", body,
                 lambda x: max(lo, min(hi, x)), _cases(r, lambda r: (r.randint(lo - 30, hi + 30),), k=4))  # fmt: skip


def _tpl_clamp3(r: random.Random) -> _Task:
    name = _pick(r, ("clamp", "clip_value", "constrain"))
    return _Task(name, "x: int, lo: int, hi: int", "int", "Clamp x to the closed range [lo, hi].",
                 "return max(lo, min(hi, x))", lambda x, lo, hi: max(lo, min(hi, x)),
                 _cases(r, lambda r: (r.randint(-50, 50), r.randint(-20, 0), r.randint(1, 20)), k=4))  # fmt: skip


def _tpl_palindrome(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("is_palindrome", "palindrome", "reads_same_backwards"))
    body = _pick(r, (f"return {s} == {s}[::-1]",
                     f"i, j = 0, len({s}) - 1\nwhile i < j:\n    if {s}[i] != {s}[j]:\n        return False\n    i += 1\n    j -= 1\nreturn True"))  # fmt: skip
    return _Task(name, f"{s}: str", "bool", f"Return True if {s} reads the same forwards and backwards.", body,
                 lambda t: t == t[::-1], _cases(r, lambda r: (_word(r),), k=4))  # fmt: skip


def _tpl_gcd(r: random.Random) -> _Task:
    name = _pick(r, ("gcd", "greatest_common_divisor"))
    return _Task(name, "a: int, b: int", "int", "Return the greatest common divisor of a and b (Euclid).",
                 "while b:\n    a, b = b, a % b\nreturn abs(a)", _gcd,
                 _cases(r, lambda r: (r.randint(0, 300), r.randint(0, 300))))  # fmt: skip


def _tpl_lcm(r: random.Random) -> _Task:
    name = _pick(r, ("lcm", "least_common_multiple"))
    return _Task(name, "a: int, b: int", "int", "Return the least common multiple of two positive integers.",
                 "x, y = a, b\nwhile y:\n    x, y = y, x % y\nreturn a * b // x", lambda a, b: a * b // _gcd(a, b),
                 _cases(r, lambda r: (r.randint(1, 60), r.randint(1, 60))))  # fmt: skip


def _tpl_power(r: random.Random) -> _Task:
    name = _pick(r, ("power", "pow_int", "raise_to"))
    return _Task(name, "base: int, exp: int", "int", "Return base ** exp for a non-negative exponent.",
                 "result = 1\nfor _ in range(exp):\n    result *= base\nreturn result", lambda b, e: b**e,
                 _cases(r, lambda r: (r.randint(-6, 9), r.randint(0, 8))))  # fmt: skip


def _tpl_is_even(r: random.Random) -> _Task:
    v = _pick(r, _INT_NAMES)
    if r.random() < 0.5:
        return _Task(_pick(r, ("is_even", "even")), f"{v}: int", "bool", f"Return True if {v} is even.",
                     f"return {v} % 2 == 0", lambda x: x % 2 == 0, _cases(r, lambda r: (r.randint(-40, 40),)))  # fmt: skip
    return _Task(_pick(r, ("is_odd", "odd")), f"{v}: int", "bool", f"Return True if {v} is odd.",
                 f"return {v} % 2 == 1", lambda x: x % 2 == 1, _cases(r, lambda r: (r.randint(-40, 40),)))  # fmt: skip


def _tpl_abs_diff(r: random.Random) -> _Task:
    name = _pick(r, ("abs_diff", "distance", "absolute_difference"))
    body = _pick(r, ("return abs(a - b)", "if a > b:\n    return a - b\nreturn b - a"))
    return _Task(name, "a: int, b: int", "int", "Return the absolute difference between a and b.", body,
                 lambda a, b: abs(a - b), _cases(r, lambda r: (r.randint(-50, 50), r.randint(-50, 50))))  # fmt: skip


def _tpl_squares(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("squares", "square_all", "square_each"))
    body = _pick(r, (f"return [x * x for x in {xs}]", f"out = []\nfor x in {xs}:\n    out.append(x ** 2)\nreturn out"))
    return _Task(name, f"{xs}: list[int]", "list[int]", "Return the square of every element.", body,
                 lambda a: [x * x for x in a], _cases(r, lambda r: (_ints(r, -9, 9, 0, 6),)))  # fmt: skip


def _tpl_filter_even(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("evens", "keep_even", "filter_even"))
    body = _pick(r, (f"return [x for x in {xs} if x % 2 == 0]",
                     f"out = []\nfor x in {xs}:\n    if x % 2 == 0:\n        out.append(x)\nreturn out"))  # fmt: skip
    return _Task(name, f"{xs}: list[int]", "list[int]", "Return the even elements, in order.", body,
                 lambda a: [x for x in a if x % 2 == 0], _cases(r, lambda r: (_ints(r, n_lo=0),)))  # fmt: skip


def _tpl_count_char(r: random.Random) -> _Task:
    ch = r.choice("aeiorstnl")
    s = _pick(r, _STR_NAMES)
    name = _pick(r, (f"count_{ch}", f"num_{ch}s", f"occurrences_of_{ch}"))
    body = _pick(r, (f"return {s}.count({ch!r})", f"return sum(1 for c in {s} if c == {ch!r})"))
    return _Task(name, f"{s}: str", "int", f"Count how many times {ch!r} occurs in {s}.", body,
                 lambda t: t.count(ch), _cases(r, lambda r: (_sentence(r),)))  # fmt: skip


def _tpl_digit_sum(r: random.Random) -> _Task:
    name = _pick(r, ("digit_sum", "sum_of_digits", "sum_digits"))
    body = _pick(r, ("return sum(int(d) for d in str(abs(n)))",
                     "n = abs(n)\ntotal = 0\nwhile n:\n    total += n % 10\n    n //= 10\nreturn total"))  # fmt: skip
    return _Task(name, "n: int", "int", "Return the sum of the decimal digits of n.", body,
                 lambda n: sum(int(d) for d in str(abs(n))), _cases(r, lambda r: (r.randint(-99999, 99999),)))  # fmt: skip


def _tpl_binary(r: random.Random) -> _Task:
    name = _pick(r, ("to_binary", "binary", "bin_string"))
    body = _pick(r, ("return bin(n)[2:]",
                     "if n == 0:\n    return '0'\nbits = ''\nwhile n:\n    bits = str(n % 2) + bits\n    n //= 2\nreturn bits"))  # fmt: skip
    return _Task(name, "n: int", "str", "Return the binary representation of a non-negative n, without prefix.",
                 body, lambda n: bin(n)[2:], _cases(r, lambda r: (r.randint(0, 1000),)))  # fmt: skip


def _tpl_running_sum(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("running_sum", "prefix_sums", "cumulative_sum"))

    def ref(a: list[int]) -> list[int]:
        out, t = [], 0
        for x in a:
            t += x
            out.append(t)
        return out

    return _Task(name, f"{xs}: list[int]", "list[int]", "Return the running totals of the list.",
                 f"out = []\ntotal = 0\nfor x in {xs}:\n    total += x\n    out.append(total)\nreturn out", ref,
                 _cases(r, lambda r: (_ints(r, n_lo=0),)))  # fmt: skip


def _tpl_index_of(r: random.Random) -> _Task:
    name = _pick(r, ("index_of", "find_index", "linear_search"))
    return _Task(name, "xs: list[int], target: int", "int", "Return the index of target in xs, or -1 if absent.",
                 "for i, x in enumerate(xs):\n    if x == target:\n        return i\nreturn -1",
                 lambda a, t: a.index(t) if t in a else -1,
                 _cases(r, lambda r: (_ints(r, 0, 9), r.randint(0, 9)), k=4))  # fmt: skip


def _tpl_chunk(r: random.Random) -> _Task:
    k = r.randint(2, 4)
    name = _pick(r, (f"chunks_of_{k}", f"split_into_{k}s", f"group_by_{k}"))
    return _Task(name, "xs: list[int]", "list[list[int]]", f"Split xs into consecutive chunks of {k} (last may be shorter).",
                 f"return [xs[i:i + {k}] for i in range(0, len(xs), {k})]",
                 lambda a: [a[i : i + k] for i in range(0, len(a), k)], _cases(r, lambda r: (_ints(r, 0, 9, 0, 9),)))  # fmt: skip


def _tpl_char_freq(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("char_counts", "letter_frequency", "char_frequency"))

    def ref(t: str) -> dict[str, int]:
        d: dict[str, int] = {}
        for ch in t:
            d[ch] = d.get(ch, 0) + 1
        return d

    return _Task(name, f"{s}: str", "dict[str, int]", f"Map each character of {s} to its number of occurrences.",
                 f"counts = {{}}\nfor ch in {s}:\n    counts[ch] = counts.get(ch, 0) + 1\nreturn counts", ref,
                 _cases(r, lambda r: (_word(r),), k=2))  # fmt: skip


def _tpl_merge(r: random.Random) -> _Task:
    name = _pick(r, ("merge_sorted", "merge", "merge_lists"))
    body = ("i, j = 0, 0\nout = []\nwhile i < len(a) and j < len(b):\n    if a[i] <= b[j]:\n        out.append(a[i])\n"
            "        i += 1\n    else:\n        out.append(b[j])\n        j += 1\nout.extend(a[i:])\nout.extend(b[j:])\nreturn out")  # fmt: skip
    return _Task(name, "a: list[int], b: list[int]", "list[int]", "Merge two sorted lists into one sorted list.",
                 body, _merge, _cases(r, lambda r: (sorted(_ints(r, 0, 30, 0, 5)), sorted(_ints(r, 0, 30, 0, 5)))))  # fmt: skip


def _tpl_second_largest(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("second_largest", "runner_up"))
    return _Task(name, f"{xs}: list[int]", "int", "Return the second largest distinct value (at least two exist).",
                 f"return sorted(set({xs}))[-2]", lambda a: sorted(set(a))[-2],
                 _cases(r, lambda r: (r.sample(range(-20, 40), r.randint(2, 7)),)))  # fmt: skip


def _tpl_count_words(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("count_words", "word_count", "num_words"))
    return _Task(name, f"{s}: str", "int", f"Return the number of whitespace-separated words in {s}.",
                 f"return len({s}.split())", lambda t: len(t.split()), _cases(r, lambda r: (_sentence(r),)))  # fmt: skip


def _tpl_dot(r: random.Random) -> _Task:
    name = _pick(r, ("dot", "dot_product", "inner_product"))
    body = _pick(r, ("return sum(x * y for x, y in zip(a, b))",
                     "total = 0\nfor i in range(len(a)):\n    total += a[i] * b[i]\nreturn total"))  # fmt: skip

    def gen(r: random.Random) -> tuple[list[int], list[int]]:
        n = r.randint(0, 5)
        return [r.randint(-9, 9) for _ in range(n)], [r.randint(-9, 9) for _ in range(n)]

    return _Task(name, "a: list[int], b: list[int]", "int", "Return the dot product of two equal-length vectors.",
                 body, lambda a, b: sum(x * y for x, y in zip(a, b, strict=True)), _cases(r, gen))  # fmt: skip


def _tpl_c_to_f(r: random.Random) -> _Task:
    name = _pick(r, ("celsius_to_fahrenheit", "c_to_f", "to_fahrenheit"))
    return _Task(name, "celsius: float", "float", "Convert a temperature from Celsius to Fahrenheit.",
                 "return celsius * 9 / 5 + 32", lambda c: c * 9 / 5 + 32, _cases(r, lambda r: (r.randint(-40, 100),)))  # fmt: skip


def _tpl_unique(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("unique", "dedupe", "remove_duplicates"))
    return _Task(name, f"{xs}: list[int]", "list[int]", "Remove duplicates, keeping the first occurrence of each value.",
                 f"seen = set()\nout = []\nfor x in {xs}:\n    if x not in seen:\n        seen.add(x)\n        out.append(x)\nreturn out",
                 lambda a: list(dict.fromkeys(a)), _cases(r, lambda r: (_ints(r, 0, 5, 0, 9),)))  # fmt: skip


def _tpl_flatten(r: random.Random) -> _Task:
    name = _pick(r, ("flatten", "flat", "concat_lists"))
    body = _pick(r, ("return [x for row in rows for x in row]",
                     "out = []\nfor row in rows:\n    out.extend(row)\nreturn out"))  # fmt: skip
    return _Task(name, "rows: list[list[int]]", "list[int]", "Flatten a list of lists into one list.", body,
                 lambda rows: [x for row in rows for x in row],
                 _cases(r, lambda r: ([_ints(r, 0, 9, 0, 3) for _ in range(r.randint(0, 4))],)))  # fmt: skip


def _tpl_title(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("capitalize_words", "title_case", "capitalise"))
    return _Task(name, f"{s}: str", "str", "Capitalize the first letter of every word.",
                 f"return ' '.join(w[:1].upper() + w[1:] for w in {s}.split(' '))",
                 lambda t: " ".join(w[:1].upper() + w[1:] for w in t.split(" ")), _cases(r, lambda r: (_sentence(r),)))  # fmt: skip


def _tpl_sum_squares(r: random.Random) -> _Task:
    name = _pick(r, ("sum_of_squares", "square_sum"))
    body = _pick(r, ("return sum(i * i for i in range(1, n + 1))", "return n * (n + 1) * (2 * n + 1) // 6"))
    return _Task(name, "n: int", "int", "Return 1**2 + 2**2 + ... + n**2.", body,
                 lambda n: sum(i * i for i in range(1, n + 1)), _cases(r, lambda r: (r.randint(0, 40),)))  # fmt: skip


def _tpl_count_positive(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("count_positive", "num_positive", "positives"))
    return _Task(name, f"{xs}: list[int]", "int", "Count the strictly positive numbers in the list.",
                 f"return sum(1 for x in {xs} if x > 0)", lambda a: sum(1 for x in a if x > 0),
                 _cases(r, lambda r: (_ints(r, n_lo=0),)))  # fmt: skip


def _tpl_sort(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("bubble_sort", "sort_list", "insertion_sort"))
    body = _pick(r, (
        f"out = list({xs})\nfor i in range(len(out)):\n    for j in range(len(out) - 1 - i):\n        if out[j] > out[j + 1]:\n"
        "            out[j], out[j + 1] = out[j + 1], out[j]\nreturn out",
        f"out = []\nfor x in {xs}:\n    i = len(out)\n    while i > 0 and out[i - 1] > x:\n        i -= 1\n    out.insert(i, x)\nreturn out",
    ))  # fmt: skip
    return _Task(name, f"{xs}: list[int]", "list[int]", "Return a sorted copy of the list (ascending).", body,
                 lambda a: sorted(a), _cases(r, lambda r: (_ints(r, n_lo=0, n_hi=8),)))  # fmt: skip


def _tpl_rotate(r: random.Random) -> _Task:
    k = r.randint(1, 3)
    name = _pick(r, (f"rotate_left_{k}", f"shift_{k}"))
    return _Task(name, "xs: list[int]", "list[int]", f"Rotate xs left by {k} positions (wrapping around).",
                 f"if not xs:\n    return []\nk = {k} % len(xs)\nreturn xs[k:] + xs[:k]",
                 lambda a: a[k % len(a):] + a[:k % len(a)] if a else [], _cases(r, lambda r: (_ints(r, 0, 9, 0, 6),)))  # fmt: skip


def _tpl_is_sorted(r: random.Random) -> _Task:
    xs = _pick(r, _LIST_NAMES)
    name = _pick(r, ("is_sorted", "sorted_ascending", "in_order"))
    return _Task(name, f"{xs}: list[int]", "bool", "Return True if the list is in non-decreasing order.",
                 f"return all({xs}[i] <= {xs}[i + 1] for i in range(len({xs}) - 1))",
                 lambda a: all(a[i] <= a[i + 1] for i in range(len(a) - 1)),
                 _cases(r, lambda r: (sorted(_ints(r, 0, 9)) if r.random() < 0.5 else _ints(r, 0, 9),), k=4))  # fmt: skip


def _tpl_fizzbuzz(r: random.Random) -> _Task:
    name = _pick(r, ("fizzbuzz", "fizz_buzz"))
    body = ("if n % 15 == 0:\n    return 'FizzBuzz'\nif n % 3 == 0:\n    return 'Fizz'\nif n % 5 == 0:\n"
            "    return 'Buzz'\nreturn str(n)")  # fmt: skip
    return _Task(name, "n: int", "str", "Return 'Fizz', 'Buzz', 'FizzBuzz' or the number, FizzBuzz style.", body,
                 _fizz, _cases(r, lambda r: (r.randint(1, 100),), k=4))  # fmt: skip


def _tpl_longest_word(r: random.Random) -> _Task:
    s = _pick(r, _STR_NAMES)
    name = _pick(r, ("longest_word", "longest"))
    return _Task(name, f"{s}: str", "str", "Return the longest word (the first one on ties).",
                 f"best = ''\nfor w in {s}.split():\n    if len(w) > len(best):\n        best = w\nreturn best",
                 lambda t: max(t.split(), key=len) if t.split() else "", _cases(r, lambda r: (_sentence(r),)))  # fmt: skip


def _tpl_triangle(r: random.Random) -> _Task:
    name = _pick(r, ("triangle_number", "triangular"))
    return _Task(name, "n: int", "int", "Return the n-th triangular number 1 + 2 + ... + n.",
                 "return n * (n + 1) // 2", lambda n: n * (n + 1) // 2, _cases(r, lambda r: (r.randint(0, 100),)))  # fmt: skip


TEMPLATES: tuple[Callable[[random.Random], _Task], ...] = (
    _tpl_add, _tpl_sub, _tpl_scale, _tpl_offset, _tpl_max, _tpl_min, _tpl_sum, _tpl_mean, _tpl_reverse_str,
    _tpl_reverse_list, _tpl_fib, _tpl_fact, _tpl_is_prime, _tpl_count_vowels, _tpl_clamp, _tpl_clamp3,
    _tpl_palindrome, _tpl_gcd, _tpl_lcm, _tpl_power, _tpl_is_even, _tpl_abs_diff, _tpl_squares, _tpl_filter_even,
    _tpl_count_char, _tpl_digit_sum, _tpl_binary, _tpl_running_sum, _tpl_index_of, _tpl_chunk, _tpl_char_freq,
    _tpl_merge, _tpl_second_largest, _tpl_count_words, _tpl_dot, _tpl_c_to_f, _tpl_unique, _tpl_flatten,
    _tpl_title, _tpl_sum_squares, _tpl_count_positive, _tpl_sort, _tpl_rotate, _tpl_is_sorted, _tpl_fizzbuzz,
    _tpl_longest_word, _tpl_triangle,
)  # fmt: skip


def synthetic_tasks(seed: int = 0) -> Iterator[Document]:
    """An endless, deterministic stream of small Python modules of 1–3 tested functions each.

    Each function comes from one of :data:`TEMPLATES` with randomised names, constants and body style;
    its asserts hold (expected values come from the template's Python reference).
    """
    r = random.Random(f"nanochat-synthetic-{seed}")
    i = 0
    while True:
        parts = []
        names: set[str] = set()
        for _ in range(r.randint(1, 3)):
            task = TEMPLATES[r.randrange(len(TEMPLATES))](r)
            if task.name in names:  # two functions of one module must not shadow each other
                continue
            names.add(task.name)
            parts.append(task.render(r))
        yield Document(f"synthetic/{seed}/{i:07d}.py", "\n\n".join(parts))
        i += 1


def synthetic_documents(num_chars: int, seed: int = 0) -> list[Document]:
    """Synthetic documents from :func:`synthetic_tasks` until at least ``num_chars`` characters."""
    out: list[Document] = []
    total = 0
    for d in synthetic_tasks(seed):
        if total >= num_chars:
            break
        out.append(d)
        total += len(d.text)
    return out
