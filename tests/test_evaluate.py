"""Bits per byte and `minigpt eval`: the byte count is exact, the sliding window scores every token once, the
score equals the model's own loss, and bits per byte do not depend on the tokenizer where nats/token do."""

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli

from minigpt.data.sources import Document
from minigpt.data.tokenizer import EOT, bits_per_byte, token_bytes, train_bpe
from minigpt.infer.evaluate import Windows, evaluate_text
from minigpt.run.load import load_run

TEXT = "def naïve(x):\n    return x ** 2  # «squared» — ünïcödé, 日本語, emoji 🙂\n" * 40


@pytest.fixture(scope="module")
def tokenizers(corpus_dir):
    text = "".join(p.read_text() for p in sorted(corpus_dir.iterdir())[:5]) + TEXT
    return [train_bpe([Document("c", text)], v) for v in (300, 1024)]


def test_bytes_per_token_add_up_to_the_texts_utf8_bytes(tokenizers):
    for tok in tokenizers:
        ids = tok.encode(TEXT).ids
        assert token_bytes(tok)[ids].sum() == len(TEXT.encode("utf-8"))  # exact, multi-byte characters too
        assert token_bytes(tok)[tok.token_to_id(EOT)] == 0  # a special token is no text
    assert len(tokenizers[0].encode(TEXT).ids) > 1.3 * len(tokenizers[1].encode(TEXT).ids)


@pytest.mark.parametrize("n, context, stride", [(2, 8, 4), (9, 8, 4), (100, 8, 3), (100, 8, 8), (33, 8, 1), (64, 16, 7)])
def test_the_sliding_window_predicts_every_token_once(n, context, stride):
    scored = []
    for start, end, first in Windows(n, context, stride):
        assert end - start <= context and first < end - start
        scored += list(range(start + 1 + first, end + 1))
    assert scored == list(range(1, n))
    assert len(Windows(n, context, stride)) == len(list(Windows(n, context, stride)))


class ByteOracle(torch.nn.Module):
    """A 'model' whose next-token distribution is p(t) proportional to 256^-bytes(t): a uniform byte model, whatever
    the tokenizer. Its bits per byte are 8 (plus log Z, tiny), its nats per token 8 ln 2 x bytes per token."""

    def __init__(self, tok):
        super().__init__()
        table = torch.from_numpy(token_bytes(tok)).double()
        self.logits = torch.where(table > 0, -table * math.log(256), torch.tensor(-1e9, dtype=torch.float64)).float()
        self.config = SimpleNamespace(block_size=64, padded_vocab_size=len(table))
        self.wte = SimpleNamespace(weight=torch.zeros(1))

    def forward(self, x):
        return SimpleNamespace(logits=self.logits.expand(*x.shape, -1))


def test_bits_per_byte_do_not_depend_on_the_tokenizer_where_nats_per_token_do(tokenizers):
    results = []
    for tok in tokenizers:
        ids = np.asarray(tok.encode(TEXT).ids, dtype=np.int64)
        results.append(evaluate_text(ByteOracle(tok), tok, ids, context=64, stride=32, show=False))
    (a, b) = results
    assert a["bits_per_byte"] == pytest.approx(8.0, abs=0.05) and b["bits_per_byte"] == pytest.approx(8.0, abs=0.05)
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], rel=0.005)
    assert b["loss_nats_per_token"] > 1.3 * a["loss_nats_per_token"]  # bigger tokens, more nats each


def test_the_score_is_the_models_own_loss(good_run):
    model, tok, cfg, _ = load_run(good_run)
    ids = np.asarray(tok.encode("import os\nfor i in range(10):\n    print(i)\n").ids[:20], dtype=np.int64)
    r = evaluate_text(model, tok, ids, show=False)  # shorter than the block: one window, every token
    x, y = torch.from_numpy(ids[:-1]).unsqueeze(0), torch.from_numpy(ids[1:]).unsqueeze(0)
    with torch.no_grad():
        assert r["loss_nats_per_token"] == pytest.approx(model(x, y).loss.item(), rel=1e-5)
    assert r["tokens_scored"] == len(ids) - 1 and r["bytes_scored"] == int(token_bytes(tok)[ids[1:]].sum())
    assert r["bits_per_byte"] == pytest.approx(bits_per_byte(r["loss_nats_per_token"] * r["tokens_scored"],
                                                             r["bytes_scored"]))


def test_minigpt_eval_on_a_text_and_on_the_runs_own_split(good_run, corpus_dir, tmp_path):
    text = tmp_path / "unseen.txt"
    text.write_text(TEXT)
    r = run_cli("eval", "--run", str(good_run), "--data", str(text), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bits_per_byte"] > 0 and out["tokens_scored"] > 0 and out["context_tokens"] == 32
    assert out["perplexity"] == pytest.approx(math.exp(out["loss_nats_per_token"]))
    r = run_cli("eval", "--run", str(good_run), "--data", "val", "--context", "16", "--stride", "8")
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout and "16-token window advancing 8" in r.stdout
    summary = json.loads((good_run / "summary.json").read_text())  # training's own eval line says bits per byte too
    assert summary["val_bpb"] > 0 and summary["unigram_entropy_bpb"] > 0


def test_bad_eval_inputs_are_one_line(good_run, tmp_path):
    (tmp_path / "empty").mkdir()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(good_run, no_tok)
    (no_tok / "tokenizer.json").unlink()
    for argv, message in [(["--data", str(tmp_path / "empty")], "matches no file"),
                          (["--data", "val", "--stride", "64", "--context", "16"], "--stride 64 must be between 1"),
                          (["--data", "val", "--context", "999"], "--context 999 must be between 1"),
                          (["--run", str(no_tok), "--data", "val"], "has no tokenizer.json")]:
        args = argv if "--run" in argv else ["--run", str(good_run), *argv]
        r = run_cli("eval", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
