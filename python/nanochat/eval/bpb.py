"""Bits per byte of a model on held-out text: the tokenizer-independent loss ``nanochat-eval bpb`` reports.

The held-out text is the validation split of the training corpus (same stable path-hash rule and settings as
``nanochat-train``, read from the run's ``config.json`` when the model is a run directory) or the validation
split of ``--data PATH``. Documents are joined with ``<|bos|>`` as in training, cut into non-overlapping windows of
``seq_len + 1`` tokens, and scored with the torch model in eval mode (on CPU the ternary layers run the Rust
kernels). Special-token targets are left out of both sums (:func:`nanochat.data.bpb.bpb_sums`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nanochat.data.bpb import bits_per_byte, bpb_sums
from nanochat.data.corpus import load_corpus


def corpus_settings(model_path: str | Path) -> dict[str, Any]:
    """Corpus settings of the run that produced ``model_path`` (run dir or a checkpoint inside it), if known."""
    p = Path(model_path)
    for d in [p, *p.parents][:4]:
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                train = json.loads(cfg.read_text())["train"]
                return {k: train[k] for k in ("data", "val_fraction", "synthetic_ratio") if k in train}
            except (KeyError, json.JSONDecodeError):
                return {}
    return {}


@torch.no_grad()
def evaluate_bpb(
    model_path: str | Path,
    data: str | None = None,
    val_fraction: float | None = None,
    synthetic_ratio: float | None = None,
    seq_len: int | None = None,
    batch_size: int = 4,
    max_tokens: int = 131_072,
    device: str = "cpu",
) -> dict[str, Any]:
    from nanochat.export.load import load

    t0 = time.perf_counter()
    loaded = load(model_path)
    model = loaded.torch_model(device)
    tok = loaded.tokenizer
    settings = corpus_settings(model_path)
    data = data if data is not None else settings.get("data")
    vf = val_fraction if val_fraction is not None else settings.get("val_fraction", 0.02)
    sr = synthetic_ratio if synthetic_ratio is not None else settings.get("synthetic_ratio", 0.2)
    corpus = load_corpus(data, val_fraction=vf, synthetic_ratio=sr, seed=0)
    docs = corpus.splits["val"]
    if not docs:
        raise ValueError("the validation split is empty; raise --val-fraction")
    T = seq_len or model.config.seq_len
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.append(tok.bos_id)
        ids.extend(enc)
        if len(ids) >= max_tokens + 1:
            break
    arr = np.asarray(ids[: max_tokens + 1], dtype=np.int64)
    n_win = (len(arr) - 1) // T
    if n_win == 0:
        raise ValueError(f"only {len(arr)} validation tokens: fewer than one window of {T + 1}")
    x_all = torch.from_numpy(arr[: n_win * T].reshape(n_win, T))
    y_all = torch.from_numpy(arr[1 : n_win * T + 1].reshape(n_win, T))
    table = torch.as_tensor(tok.token_bytes(), dtype=torch.long)
    nats, nbytes, ntok, nats_all = 0.0, 0, 0, 0.0
    for i in range(0, n_win, batch_size):
        x, y = x_all[i : i + batch_size].to(device), y_all[i : i + batch_size].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        s, b = bpb_sums(loss.cpu(), y.cpu(), table)
        nats, nbytes = nats + s, nbytes + b
        nats_all += float(loss.double().sum())
        ntok += y.numel()
    return {
        "model": str(model_path),
        "bpb": bits_per_byte(nats, nbytes),
        "val_loss": nats_all / ntok,
        "tokens": ntok,
        "bytes": nbytes,
        "perplexity": math.exp(nats_all / ntok),
        "corpus": corpus.description,
        "val_fraction": vf,
        "synthetic_ratio": sr,
        "seq_len": T,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": time.perf_counter() - t0,
    }
