"""Data pipeline: tokenizer, corpus, synthetic tasks, token shards, loader, bits per byte.

Typical use::

    from nanochat.data import prepare_data, data_report, TokenLoader
    tok, index = prepare_data("~/.cache/nanochat/data", vocab_size=8192)   # the default spec + synthetic
    data_report(index.root)["corpus"]["sources"]                   # what was read, kept and dropped, per source
    train = TokenLoader(index, "train", batch_size=8, seq_len=512, rank=rank, world_size=world)
    x, y = train.next_batch()                                      # (B, T) int64 each

Names are re-exported lazily (:func:`nanochat.lazy_exports`): the tokenizer, which inference needs, must not pull in
torch (the loader and bits-per-byte use it).
"""

from __future__ import annotations

from nanochat import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["bits_per_byte", "bpb_sums", "target_bytes"], "bpb"),
    **dict.fromkeys(
        [
            "Corpus",
            "CorpusPlan",
            "Document",
            "build_corpus",
            "iter_documents",
            "load_corpus",
            "near_duplicates",
            "plan_corpus",
            "split_documents",
            "split_of",
            "stdlib_documents",
        ],
        "corpus",
    ),
    **dict.fromkeys(["NgramIndex", "humaneval_index"], "decontam"),
    "TokenLoader": "loader",
    **dict.fromkeys(["data_cache_dir", "data_report", "prepare_data", "prepare_tokenizer"], "prepare"),
    **dict.fromkeys(["ShardIndex", "ShardInfo", "build_shards", "token_dtype"], "shards"),
    **dict.fromkeys(["DEFAULT_SPEC", "Source", "parse_spec"], "sources"),
    **dict.fromkeys(["synthetic_documents", "synthetic_tasks"], "synthetic"),
    **dict.fromkeys(["SPECIAL_TOKENS", "Tokenizer"], "tokenizer"),
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
