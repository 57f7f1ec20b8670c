"""Data pipeline: sources, deterministic split, token cache, memmap dtype, batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sasoftmax.lm.data import (
    BatchSampler,
    DataConfig,
    Document,
    eval_windows,
    iter_documents,
    load_token_data,
    split_documents,
    stdlib_root,
)

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog number {i * 7 % 13}.\n" for i in range(400))


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(TEXT[i * 1000 :] + f"document {i}\n")
    return folder


def test_stdlib_corpus_is_found():
    cfg = DataConfig(source="stdlib", max_chars=200_000)
    docs = list(iter_documents(cfg))
    assert docs, "no stdlib documents"
    assert stdlib_root().is_dir()
    names = [d.id.rsplit("#", 1)[0] for d in docs]
    assert all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n or "/test/" in f"/{n}" for n in names)
    assert names == sorted(names), "stdlib files must come in sorted order"
    assert sum(len(d.text) for d in docs) == 200_000


def test_split_is_deterministic_and_order_independent():
    docs = [Document(f"file{i}.txt#0", f"text {i}") for i in range(200)]
    train, val = split_documents(docs, 0.1)
    train2, val2 = split_documents(list(reversed(docs)), 0.1)
    assert {d.id for d in val} == {d.id for d in val2}
    assert {d.id for d in train} == {d.id for d in train2}
    assert not {d.id for d in train} & {d.id for d in val}
    assert 5 <= len(val) <= 40  # roughly 10 %


def test_tiny_corpus_still_gets_both_splits():
    docs = [Document("a#0", "x"), Document("b#0", "y")]
    train, val = split_documents(docs, 0.01)
    assert len(train) == 1 and len(val) == 1


def test_single_file_is_cut_into_documents(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text(TEXT)
    docs = list(iter_documents(DataConfig(source=str(f), doc_chars=2000)))
    assert len(docs) > 5
    assert all(len(d.text) <= 2000 for d in docs)
    assert "".join(d.text for d in docs) == TEXT
    assert all(d.text.endswith("\n") for d in docs[:-1]), "cuts happen at line boundaries"


def test_byte_cache_reuse_and_dtype(corpus, tmp_path):
    cfg = DataConfig(source=str(corpus), tokenizer="bytes", doc_chars=3000, cache_dir=str(tmp_path / "cache"))
    a = load_token_data(cfg)
    assert a.vocab_size == 256
    assert isinstance(a.train, np.memmap) and a.train.dtype == np.uint16
    assert len(a.train) > 0 and len(a.val) > 0
    assert a.tokenizer().decode(a.train[:20]) == (corpus / "doc0.txt").read_text()[:20]
    stamp = (a.directory / "train.bin").stat().st_mtime_ns
    b = load_token_data(cfg)
    assert b.directory == a.directory
    assert (b.directory / "train.bin").stat().st_mtime_ns == stamp, "second load must reuse the cache"
    np.testing.assert_array_equal(np.asarray(a.val), np.asarray(b.val))
    # changing a setting or the source gives another cache entry
    c = load_token_data(DataConfig(**{**cfg.__dict__, "val_fraction": 0.3}))
    assert c.directory != a.directory
    leftovers = [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary build directories left behind: {leftovers}"


def test_bpe_tokenizer_trained_and_cached(corpus, tmp_path):
    cfg = DataConfig(source=f"{corpus}/*.txt", tokenizer="bpe", vocab_size=300, doc_chars=3000,
                     cache_dir=str(tmp_path / "cache"))
    d = load_token_data(cfg)
    assert d.vocab_size <= 300 and d.train.dtype == np.uint16
    assert int(np.max(d.train)) < d.vocab_size
    tok = d.tokenizer()
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
    assert (d.directory / "tokenizer.bpe.json").exists()


def test_empty_corpus_names_the_source(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        load_token_data(DataConfig(source=str(empty), tokenizer="bytes", cache_dir=str(tmp_path / "c")))
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(ValueError, match="nothing.*empty"):
        load_token_data(DataConfig(source=str(folder), tokenizer="bytes", cache_dir=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="missing"):
        load_token_data(DataConfig(source=str(tmp_path / "missing"), tokenizer="bytes", cache_dir=str(tmp_path)))


def test_bad_data_config_names_field():
    with pytest.raises(ValueError, match="data.tokenizer"):
        DataConfig(tokenizer="words").validate()
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataConfig(val_fraction=1.5).validate()


def test_hf_source_without_datasets_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="datasets"):
        load_token_data(DataConfig(source="hf:wikitext:wikitext-2-raw-v1", cache_dir=str(tmp_path)))


def test_sampler_is_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    s = BatchSampler(tokens, 16, 4, seed=3)
    x1, y1 = s.get(5)
    x2, y2 = BatchSampler(tokens, 16, 4, seed=3).get(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (4, 16) and x1.dtype == torch.int64
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(s.get(6)[0], x1)
    assert not torch.equal(BatchSampler(tokens, 16, 4, seed=4).get(5)[0], x1)


def test_sampler_shards_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16)
    single = BatchSampler(tokens, 8, 2, seed=1, grad_accum=4)
    full = torch.cat([single.get(7, m)[0] for m in range(4)])
    ranks = [BatchSampler(tokens, 8, 2, seed=1, grad_accum=2, world_size=2, rank=r) for r in range(2)]
    sharded = torch.cat([ranks[r].get(7, m)[0] for m in range(2) for r in range(2)])
    assert torch.equal(full, sharded)
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(tokens, 8, 2, world_size=2, rank=2)


def test_eval_windows_are_non_overlapping():
    tokens = np.arange(100, dtype=np.uint16)
    w = eval_windows(tokens, 10, 5)
    assert w.shape == (5, 11)
    starts = w[:, 0].tolist()
    assert starts == [0, 19, 38, 57, 76], "windows spread evenly over the stream"
    assert all(b - a >= 10 for a, b in zip(starts, starts[1:], strict=False)), "windows must not overlap"
    assert w[-1, -1] <= 99
    full = eval_windows(tokens, 33, 99)
    assert full.shape == (3, 34) and full[:, 0].tolist() == [0, 33, 66]
    with pytest.raises(ValueError, match="length 200"):
        eval_windows(tokens, 200, 1)
