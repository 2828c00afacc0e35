"""The HumanEval generation backend: ``load_generate(path) -> (generate, model_info)``.

``generate(prompts, n, temperature, max_new_tokens, stop, seed)`` returns ``n`` continuations per prompt (without
the prompt). Each prompt is encoded after ``<|bos|>`` (documents start that way in training); generation stops at a
stop string, at ``<|eos|>``/``<|bos|>`` (the start of another document) or after ``max_new_tokens``. Sample ``i``
of prompt ``j`` uses seed ``(seed + j) * 100_003 + i``, so results do not depend on how prompts are batched.
Sequences are decoded together in batches of ``batch_size`` through :class:`nanochat.engine.Engine` (the Rust
engine on CPU for ternary models). With temperature 0 the ``n`` samples are identical, so one is generated.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanochat.engine.generate import GenerationResult


class EngineGenerate:
    """Callable generation backend over a loaded model; counts the tokens it generated (for tokens/s)."""

    def __init__(self, path: str | Path, batch_size: int = 16) -> None:
        from nanochat.engine import Engine
        from nanochat.export.load import load

        self.loaded: Any = load(path)
        self.engine = Engine(self.loaded)
        self.tok = self.loaded.tokenizer
        self.batch_size = batch_size
        self.tokens_generated = 0
        self.stop_ids = {self.tok.eos_id, self.tok.bos_id}

    def __call__(
        self, prompts: list[str], n: int, temperature: float, max_new_tokens: int, stop: list[str], seed: int
    ) -> list[list[str]]:
        reps = 1 if temperature <= 0 else n
        jobs = [(j, i) for j in range(len(prompts)) for i in range(reps)]
        ids = [[self.tok.bos_id, *self.tok.encode(p)] for p in prompts]
        out: list[list[str]] = [[] for _ in prompts]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            results = self.engine.generate_batch(
                [ids[j] for j, _ in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=[(seed + j) * 100_003 + i for j, i in chunk],
                stop=stop,
                stop_token_ids=self.stop_ids,
            )
            for (j, _), r in zip(chunk, results, strict=True):
                out[j].append(r.text)
                self.tokens_generated += len(r.token_ids)
        return [o * n if reps == 1 else o for o in out]

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, batch_size: int = 16) -> EngineGenerate:
        """The same backend over an in-memory torch ``GPT`` (the training loop's model) and its tokenizer."""
        from nanochat.engine import Engine

        self = cls.__new__(cls)
        self.loaded = None
        self.engine = Engine(model, tokenizer)
        self.tok = tokenizer
        self.batch_size = batch_size
        self.tokens_generated = 0
        self.stop_ids = {tokenizer.eos_id, tokenizer.bos_id}
        return self

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
        until: Sequence[Callable[[str], int | None]] | None = None,
        stop_ids: Iterable[int] | None = None,
    ) -> list[list[GenerationResult]]:
        """``n`` continuations of each token-id prompt (used as given: no ``<|bos|>`` is added), seeded as
        :meth:`__call__` seeds them. ``until[j](text)`` says where prompt ``j``'s text is complete (a cut position)
        or ``None`` while it is not known yet; a sequence stops as soon as it is known, and its text is cut there
        (``token_ids`` keeps every generated token). ``stop_ids`` (default: eos and bos) end a sequence as well."""
        stops = set(self.stop_ids if stop_ids is None else stop_ids)
        reps = 1 if temperature <= 0 else n
        jobs = [(j, i) for j in range(len(prompts)) for i in range(reps)]
        out: list[list[GenerationResult]] = [[] for _ in prompts]
        for b in range(0, len(jobs), self.batch_size):
            chunk = jobs[b : b + self.batch_size]
            seqs = self.engine.start(
                [prompts[j] for j, _ in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=[(seed + j) * 100_003 + i for j, i in chunk],
                stop_token_ids=stops,
            )
            cuts: list[int | None] = [None] * len(chunk)
            while not all(q.done for q in seqs):
                self.engine.step(seqs)
                if until is None:
                    continue
                for c, ((j, _), q) in enumerate(zip(chunk, seqs, strict=True)):
                    if cuts[c] is None and q.stream.text:
                        cuts[c] = until[j](q.stream.text)
                        if cuts[c] is not None and not q.done:
                            q.finish_reason, q.stream.stopped = "stop", True  # as Generation.close() stops one
            for (j, _), q, cut in zip(chunk, seqs, cuts, strict=True):
                r = q.result()
                if cut is not None:
                    r = dataclasses.replace(r, text=r.text[:cut], finish_reason="stop")
                out[j].append(r)
                self.tokens_generated += len(r.token_ids)
        return [o * n if reps == 1 else o for o in out]


def load_generate(path: str | Path) -> tuple[EngineGenerate, dict[str, Any]]:
    gen = EngineGenerate(path)
    p = Path(path)
    info: dict[str, Any] = {
        "path": str(p),
        "format": gen.loaded.format,
        "backend": gen.engine.backend_name,
        "config": gen.loaded.config.to_dict(),
    }
    try:
        import torch

        from nanochat.model import GPT

        with torch.device("meta"):
            info["params"] = GPT(gen.loaded.config).param_counts()["total"]
    except Exception:  # parameter count is informational
        pass
    if p.is_file():
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        info["sha256"] = h.hexdigest()
    return gen, info
