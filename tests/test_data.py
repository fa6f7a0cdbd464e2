import json
import math

import numpy as np
import pytest

from minigpt.core.config import DataConfig, ModelConfig
from minigpt.core.errors import UserError
from minigpt.data import cache as data
from minigpt.data.loader import check_split_length, get_batch
from minigpt.data.sources import local_files, stdlib_files


def prep(source, tmp_path, vocab=320, **kw):
    return data.prepare_data(DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), val_fraction=0.2, **kw),
                             ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=vocab), log=lambda *a: None)


def test_stdlib_source_is_sorted_real_python_without_tests_or_site_packages():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    parts = {p for f in files for p in f.parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert all(f.suffix == ".py" for f in files)


def test_prepare_writes_tokens_manifest_and_reuses_the_cache(corpus_dir, tmp_path):
    p = prep(corpus_dir, tmp_path)
    m = p.manifest
    assert not p.reused
    assert m["num_documents"] == len(list(corpus_dir.iterdir()))
    assert m["tokenizer_vocab_size"] <= 320 and m["dtype"] == "uint16"
    train, val = p.tokens("train"), p.tokens("val")
    assert len(train) == m["train_tokens"] > 0 and len(val) == m["val_tokens"] > 0
    assert train.max() < m["tokenizer_vocab_size"]
    # the unigram entropy is that of the train tokens
    counts = np.bincount(np.asarray(train)).astype(float)
    q = counts[counts > 0] / counts.sum()
    assert m["unigram_entropy_nats"] == pytest.approx(-(q * np.log(q)).sum())
    assert m["unigram_entropy_bits"] == pytest.approx(m["unigram_entropy_nats"] / math.log(2))
    # tokens decode back to the corpus text
    tok = p.load_tokenizer()
    first = sorted(corpus_dir.iterdir())[0].read_text()
    assert tok.decode(tok.encode(first).ids) == first
    again = prep(corpus_dir, tmp_path)
    assert again.reused and again.path == p.path
    # a changed input is a new cache entry
    (corpus_dir / "zz_extra.txt").write_text("one more document\n" * 50)
    try:
        changed = prep(corpus_dir, tmp_path)
        assert not changed.reused and changed.path != p.path
    finally:
        (corpus_dir / "zz_extra.txt").unlink()


def test_large_vocabularies_use_uint32(corpus_dir, tmp_path):
    p = prep(corpus_dir, tmp_path, vocab=70_000, max_chars=20_000)
    assert p.manifest["dtype"] == "uint32" and p.tokens("train").dtype == np.uint32


def test_globs_and_single_files(tmp_path):
    d = tmp_path / "texts"
    (d / "sub").mkdir(parents=True)
    for i in range(6):
        (d / "sub" / f"doc{i}.txt").write_text(f"document {i}: " + "hello world, tokens here. " * 40)
    assert len(local_files(str(d / "**" / "*.txt"))) == 6
    assert len(local_files(str(d))) == 6
    p = prep(d / "sub" / "doc0.txt", tmp_path, vocab=300)
    assert p.manifest["num_documents"] == 1
    assert "last" in p.manifest["val_split"]  # one document: the stream is split instead


def test_datasets_sources(tmp_path):
    import datasets

    rows = [{"body": f"sample text number {i} " * 30, "id": i} for i in range(40)]
    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    p = prep(jl, tmp_path, text_column="body")
    assert p.manifest["num_documents"] == 40
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    q = prep(saved, tmp_path, text_column="body")
    assert q.manifest["num_documents"] == 40
    with pytest.raises(UserError, match=r"no column 'text'.*set data.text_column"):
        prep(saved, tmp_path)


def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="unreachable .offline.*give a local path"):
        prep("hf:someone/missing-dataset", tmp_path)


@pytest.mark.parametrize("setup, message", [
    ("missing", "matches no file"),
    ("empty", "is empty"),
    ("binary", "no decodable text"),
])
def test_bad_corpora(tmp_path, setup, message):
    d = tmp_path / "c"
    d.mkdir()
    if setup == "empty":
        (d / "a.txt").write_text("   \n")
    elif setup == "binary":
        (d / "a.bin").write_bytes(bytes(range(128, 256)) * 10)
    src = d / "nothing*" if setup == "missing" else d
    with pytest.raises(UserError, match=message):
        prep(src, tmp_path)


def test_vocab_too_small_for_byte_level_bpe(corpus_dir, tmp_path):
    with pytest.raises(UserError, match="at least 257"):
        prep(corpus_dir, tmp_path, vocab=200)


def test_batches_are_deterministic_and_differ_by_rank_and_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = get_batch(tokens, 4, 16, (1, 0, 5, 0, 0))
    b = get_batch(tokens, 4, 16, (1, 0, 5, 0, 0))
    assert all((u == v).all() for u, v in zip(a, b))
    other_rank = get_batch(tokens, 4, 16, (1, 0, 5, 1, 0))
    other_step = get_batch(tokens, 4, 16, (1, 0, 6, 0, 0))
    assert not (a[0] == other_rank[0]).all() and not (a[0] == other_step[0]).all()
    x, y = a
    assert x.shape == (4, 16) and (y[:, :-1] == x[:, 1:]).all()  # targets are inputs shifted by one


def test_short_split_is_a_clear_error():
    with pytest.raises(UserError, match="too few"):
        check_split_length(np.zeros(10, dtype=np.uint16), "validation", 32)


def test_a_given_tokenizer_json_is_used_and_checked(corpus_dir, tmp_path):
    first = prep(corpus_dir, tmp_path, vocab=400)
    tok_path = str(first.tokenizer_path)
    again = prep(corpus_dir, tmp_path, vocab=512, tokenizer=tok_path)
    assert again.manifest["tokenizer"] == str(first.tokenizer_path.resolve())
    assert (again.tokens("train")[:100] == first.tokens("train")[:100]).all()  # the same encoding
    with pytest.raises(UserError, match=r"set model.vocab_size=400"):
        prep(corpus_dir, tmp_path, vocab=300, tokenizer=tok_path)
    with pytest.raises(UserError, match="is not a file"):
        prep(corpus_dir, tmp_path, tokenizer=str(tmp_path / "missing.json"))


def test_document_aligned_windows_start_after_an_end_of_text_and_a_bad_value_is_refused():
    from minigpt.data.loader import document_starts

    eot = 0
    tokens = np.array([5, 6, 7, eot, 8, 9, 10, 11, eot, 12, 13, 14, 15, 16, 17, eot, 1, 2], dtype=np.uint16)
    starts = document_starts(tokens, eot, seq_len=3)
    assert starts.tolist() == [0, 4, 9]  # the last document is too short for a window of 4
    x, y = get_batch(tokens, 64, 3, (1, 0, 0, 0), starts)
    assert {int(r[0]) for r in x} == {5, 8, 12} and (y[:, :-1] == x[:, 1:]).all()
    with pytest.raises(UserError, match="needs a tokenizer"):
        document_starts(tokens, None, 3)
    with pytest.raises(UserError, match='choose "none"'):
        DataConfig(align="start").validate()
