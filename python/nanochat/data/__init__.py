"""Data pipeline: tokenizer, corpus, synthetic tasks, token shards, loader, bits per byte.

Typical use::

    from nanochat.data import prepare_data, data_report, TokenLoader
    tok, index = prepare_data("~/.cache/nanochat/data", vocab_size=8192)   # stdlib + site-packages + synthetic
    data_report(index.root)["corpus"]["sources"]                   # what was read, kept and dropped, per source
    train = TokenLoader(index, "train", batch_size=8, seq_len=512, rank=rank, world_size=world)
    x, y = train.next_batch()                                      # (B, T) int64 each
"""

from nanochat.data.bpb import bits_per_byte, bpb_sums, target_bytes
from nanochat.data.corpus import (
    Corpus,
    CorpusPlan,
    Document,
    build_corpus,
    iter_documents,
    load_corpus,
    near_duplicates,
    plan_corpus,
    split_documents,
    split_of,
    stdlib_documents,
)
from nanochat.data.decontam import NgramIndex, humaneval_index
from nanochat.data.loader import TokenLoader
from nanochat.data.prepare import data_cache_dir, data_report, prepare_data, prepare_tokenizer
from nanochat.data.shards import ShardIndex, ShardInfo, build_shards, token_dtype
from nanochat.data.sources import DEFAULT_SPEC, Source, parse_spec
from nanochat.data.synthetic import synthetic_documents, synthetic_tasks
from nanochat.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "DEFAULT_SPEC",
    "SPECIAL_TOKENS",
    "Corpus",
    "CorpusPlan",
    "Document",
    "NgramIndex",
    "ShardIndex",
    "ShardInfo",
    "Source",
    "TokenLoader",
    "Tokenizer",
    "bits_per_byte",
    "bpb_sums",
    "build_corpus",
    "build_shards",
    "data_cache_dir",
    "data_report",
    "humaneval_index",
    "iter_documents",
    "load_corpus",
    "near_duplicates",
    "parse_spec",
    "plan_corpus",
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
