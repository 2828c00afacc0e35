"""Data pipeline: tokenizer, corpus, synthetic tasks, token shards, loader, bits per byte.

Typical use::

    from nanochat.data import prepare_data, TokenLoader
    tok, index = prepare_data("runs/data", vocab_size=8192)      # stdlib + synthetic, no download
    train = TokenLoader(index, "train", batch_size=8, seq_len=512, rank=rank, world_size=world)
    x, y = train.next_batch()                                      # (B, T) int64 each
"""

from nanochat.data.bpb import bits_per_byte, bpb_sums, target_bytes
from nanochat.data.corpus import (
    Corpus,
    Document,
    iter_documents,
    load_corpus,
    split_documents,
    split_of,
    stdlib_documents,
)
from nanochat.data.loader import TokenLoader
from nanochat.data.prepare import prepare_data, prepare_tokenizer
from nanochat.data.shards import ShardIndex, ShardInfo, build_shards, token_dtype
from nanochat.data.synthetic import synthetic_documents, synthetic_tasks
from nanochat.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "Corpus",
    "Document",
    "ShardIndex",
    "ShardInfo",
    "TokenLoader",
    "Tokenizer",
    "bits_per_byte",
    "bpb_sums",
    "build_shards",
    "iter_documents",
    "load_corpus",
    "prepare_data",
    "prepare_tokenizer",
    "split_documents",
    "split_of",
    "stdlib_documents",
    "synthetic_documents",
    "synthetic_tasks",
    "target_bytes",
    "token_dtype",
]
