"""The byte-level BPE tokenizer: trained on a corpus, or read from a tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from minigpt.core.errors import UserError
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


def read_tokenizer(path: Path, missing: str, name: str = ""):
    """A tokenizer.json; UserError with `missing` (the fix) when absent, one line when invalid
    (naming it `name`, default the path)."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise UserError(missing)
    try:
        return Tokenizer.from_file(str(path))
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
