"""The byte-level BPE tokenizer: trained on a corpus, or read from a tokenizer.json."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from minigpt.core.errors import UserError
from minigpt.core.files import read_regular
from minigpt.data.sources import BYTE_ALPHABET, Document

EOT = "<|endoftext|>"


def train_bpe(docs: list[Document], vocab_size: int):
    """Byte-level BPE (GPT-2's scheme) trained on the documents with `tokenizers`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < BYTE_ALPHABET + 1:
        raise UserError(
            f"model.vocab_size = {vocab_size} is too small for byte-level BPE: it needs at least "
            f"{BYTE_ALPHABET + 1} (256 byte tokens + {EOT}); set model.vocab_size >= {BYTE_ALPHABET + 1}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d.text for d in docs), trainer, length=len(docs))
    return tok


MAX_TOKENIZER_BYTES = 1 << 30  # the largest tokenizer.json read (a 256k-token vocabulary's is ~30 MB)


def read_tokenizer(path: Path, missing: str, name: str = "", data: bytes | None = None):
    """A tokenizer.json (or its bytes, already read and checked); UserError with `missing` (the fix) when
    absent, one line when not a regular file or invalid (naming it `name`, default the path)."""
    from tokenizers import Tokenizer

    if data is None:
        if not os.path.lexists(path):
            raise UserError(missing)
        data = read_regular(Path(path), "tokenizer", MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:
        raise UserError(f"{name or path} is not a valid tokenizer.json: {str(e).splitlines()[0][:160]}") from None


def load_tokenizer_file(path: str, vocab_size: int):
    tok = read_tokenizer(path, f"data.tokenizer = {path!r} is not a file: give a tokenizer.json path or 'bpe'",
                         name=f"data.tokenizer = {path!r}")
    if tok.get_vocab_size() > vocab_size:
        raise UserError(
            f"tokenizer {path} has {tok.get_vocab_size():,} tokens but model.vocab_size = {vocab_size:,}; "
            f"set model.vocab_size={tok.get_vocab_size()}"
        )
    return tok


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Radford et al. 2019, encoder.py bytes_to_unicode), inverted:
    the printable character that stands for each of the 256 bytes -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


def token_bytes(tokenizer, size: int | None = None) -> np.ndarray:
    """Bytes of UTF-8 text each token id stands for (0 for special tokens such as <|endoftext|>): the
    denominator of bits per byte. Exact for byte-level BPE (each character of a token is one byte); for
    other tokenizers the UTF-8 length of the token decoded alone (a character split across tokens then
    counts in each part). `size`: the array's length (the model's padded vocabulary; extra ids are 0)."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    alphabet = _byte_level_alphabet()
    byte_level = all(c in alphabet for tok in list(vocab)[:2000] for c in tok)
    out = np.zeros(max(size or 0, tokenizer.get_vocab_size()), dtype=np.int64)
    for tok, i in vocab.items():
        if tok in special:
            continue
        out[i] = len(tok) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return out


def bits_per_byte(nats: float, num_bytes: float) -> float | None:
    """Summed cross-entropy in nats over the tokens of `num_bytes` bytes of text -> bits per byte."""
    return nats / (math.log(2) * num_bytes) if num_bytes > 0 else None
