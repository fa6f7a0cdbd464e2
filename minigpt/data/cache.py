"""Text in, tokens out: corpus sources, a byte-level BPE tokenizer, a token file, and batches.

Sources (DataConfig.source):
  "stdlib"        the running Python's standard-library `.py` files (sorted; test packages and
                  site-packages left out): real text on every machine, no download.
  a path or glob  local text files or directories of them (every file that decodes as UTF-8).
  a datasets dir  a folder written by `Dataset.save_to_disk`, read with `datasets.load_from_disk`.
  a data file     .json/.jsonl/.parquet/.csv read with `datasets.load_dataset`.
  "hf:NAME"       a Hub dataset through `datasets.load_dataset` (needs the network).

Prepared data lives in a cache folder named by a hash of the inputs (the documents' names and
bytes, the tokenizer and the split), so it is built once and reused until the inputs change:
  tokenizer.json, train.bin, val.bin (flat uint16 / uint32 token ids), manifest.json.
Documents are joined with the tokenizer's `<|endoftext|>` token. A document goes to validation
when a hash of its name falls below `val_fraction`, so validation samples the whole corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from minigpt.core.config import DataConfig, ModelConfig
from minigpt.core.errors import UserError, write_error
from minigpt.core.progress import Progress
from minigpt.data.sources import Document, load_documents
from minigpt.data.tokenizer import EOT, load_tokenizer_file, train_bpe

FORMAT_VERSION = 2  # bump when the prepared layout changes, to invalidate old caches (2: relative names)
PINNED = ("source", "inputs_sha256", "num_documents", "num_chars", "tokenizer")  # what a resumed run must find again
VERIFY_HASH_BYTES = 256 << 20  # token files up to this size are re-hashed before reuse


@dataclass
class PreparedData:
    """Token files on disk plus what a user should know about them."""

    path: Path
    manifest: dict
    tokenizer_path: Path
    reused: bool
    _tokenizer: object = field(default=None, init=False, repr=False, compare=False)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def load_tokenizer(self):
        """The corpus's tokenizer, read once (a run asks for it at its start and at every sample)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
        return self._tokenizer

    def summary_lines(self) -> list[str]:
        m = self.manifest
        return [
            f"corpus   {m['source']}: {m['num_documents']:,} documents, {m['num_chars']:,} characters"
            + (f" ({m['skipped_undecodable']} undecodable files skipped)" if m["skipped_undecodable"] else ""),
            f"tokens   {m['train_tokens']:,} train + {m['val_tokens']:,} validation "
            f"({m['chars_per_token']:.2f} chars/token, vocabulary {m['tokenizer_vocab_size']:,}, {m['dtype']})",
            f"entropy  unigram {m['unigram_entropy_nats']:.3f} nats/token ({m['unigram_entropy_bits']:.3f} bits): "
            f"the loss of a model that ignores context",
            f"cache    {self.path} ({'reused' if self.reused else 'built'})",
        ]




# ----------------------------------------------------------------------------------------------
# prepare


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("MINIGPT_CACHE", "~/.cache/minigpt")).expanduser()


def _is_val(name: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def prepare_data(data_cfg: DataConfig, model_cfg: ModelConfig, log: Callable[[str], None] = print,
                 show_progress: bool = True) -> PreparedData:
    """Build (or reuse) the token files for this corpus and tokenizer; return where they are.

    Long phases report progress on stderr (a bar on a terminal, periodic lines otherwise)."""
    t0 = time.time()
    docs, skipped = load_documents(data_cfg, show_progress)
    digest = _inputs_digest(docs, data_cfg, model_cfg)
    root = cache_root(data_cfg)
    final = root / digest[:16]
    if (final / "manifest.json").is_file():
        manifest = json.loads((final / "manifest.json").read_text())
        problem = cache_problem(final, manifest)
        if problem is None:
            return PreparedData(final, manifest, final / "tokenizer.json", reused=True)
        log(f"cache    {final} is damaged ({problem}): rebuilding it")
        shutil.rmtree(final, ignore_errors=True)
    if data_cfg.tokenizer == "bpe":
        if show_progress:
            log(f"tokenizer training byte-level BPE of {model_cfg.vocab_size:,} tokens on "
                f"{sum(len(d.text) for d in docs):,} characters")
        tok = train_bpe(docs, model_cfg.vocab_size)
    else:
        tok = load_tokenizer_file(data_cfg.tokenizer, model_cfg.vocab_size)
    dtype = np.uint16 if model_cfg.vocab_size < 2**16 else np.uint32
    arrays, n_val_docs, split_rule = _tokenize_splits(docs, tok, data_cfg.val_fraction, dtype, show_progress)
    counts = np.bincount(arrays["train"], minlength=tok.get_vocab_size()).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    entropy = float(-(p * np.log(p)).sum())
    num_chars = sum(len(d.text) for d in docs)
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": data_cfg.source if data_cfg.source != "stdlib" else f"stdlib ({sysconfig.get_paths()['stdlib']})",
        "inputs_sha256": digest,
        "num_documents": len(docs),
        "skipped_undecodable": skipped,
        "num_chars": num_chars,
        "tokenizer": _tokenizer_id(data_cfg),
        "tokenizer_vocab_size": tok.get_vocab_size(),
        "model_vocab_size": model_cfg.vocab_size,
        "eot_id": tok.token_to_id(EOT),
        "dtype": np.dtype(dtype).name,
        "train_tokens": int(len(arrays["train"])),
        "val_tokens": int(len(arrays["val"])),
        "val_documents": n_val_docs,
        "val_split": split_rule,
        "chars_per_token": num_chars / max(len(arrays["train"]) + len(arrays["val"]), 1),
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / math.log(2),
        "prepare_seconds": round(time.time() - t0, 2),
        "files_sha256": {f"{k}.bin": hashlib.sha256(v.tobytes()).hexdigest() for k, v in arrays.items()},
    }
    try:
        _write_cache(root, final, tok, arrays, manifest)
    except Exception as e:  # a full disk says so from tokenizers (an Exception) or the OS, with or without a path
        error = write_error(e, root)
        if error is None:
            raise
        raise UserError(f"{error} (the token cache; data.cache_dir or $MINIGPT_CACHE move it)") from None
    return PreparedData(final, manifest, final / "tokenizer.json", reused=False)


def cache_problem(folder: Path, manifest: dict) -> str | None:
    """What is wrong with a token cache, checked against its manifest: missing files, sizes, and
    (up to VERIFY_HASH_BYTES) SHA-256. None when it can be reused."""
    if manifest.get("format_version") != FORMAT_VERSION or not (folder / "tokenizer.json").is_file():
        return "an older format, or tokenizer.json missing"
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in ("train", "val"):
        path, expected = folder / f"{split}.bin", manifest[f"{split}_tokens"] * itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != expected:
            return f"{path.name} has {max(size, 0):,} bytes, the manifest says {expected:,}"
        digest = manifest.get("files_sha256", {}).get(path.name)
        if digest and size <= VERIFY_HASH_BYTES and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            return f"{path.name} does not match its SHA-256 in the manifest"
    return None


def describe_change(before: dict, after: dict) -> str:
    """How a corpus differs from the one a run was pinned to (data.json), in words."""
    if before["source"] != after["source"]:
        return f"data.source was {before['source']!r}, now {after['source']!r}"
    if before.get("tokenizer") != after.get("tokenizer"):
        return f"data.tokenizer was {before.get('tokenizer')!r}, now {after.get('tokenizer')!r}"
    then, now = (f"{m['num_documents']:,} documents, {m['num_chars']:,} characters" for m in (before, after))
    return f"{after['source']}: {then} when the run started, {now} now" if then != now else \
        f"{after['source']}: as many documents and characters as when the run started, with different content"


def _tokenizer_id(data_cfg: DataConfig) -> str:
    return "bpe" if data_cfg.tokenizer == "bpe" else str(Path(data_cfg.tokenizer).resolve())


def _inputs_digest(docs: list[Document], data_cfg: DataConfig, model_cfg: ModelConfig) -> str:
    """SHA-256 of everything the token files depend on: settings, tokenizer file, documents."""
    hasher = hashlib.sha256()
    settings = dict(version=FORMAT_VERSION, tokenizer=_tokenizer_id(data_cfg), vocab_size=model_cfg.vocab_size,
                    val_fraction=data_cfg.val_fraction, max_chars=data_cfg.max_chars)
    hasher.update(json.dumps(settings, sort_keys=True).encode())
    if data_cfg.tokenizer != "bpe" and Path(data_cfg.tokenizer).is_file():
        hasher.update(Path(data_cfg.tokenizer).read_bytes())
    for d in docs:
        hasher.update(d.name.encode("utf-8") + b"\0" + d.text.encode("utf-8") + b"\0")
    return hasher.hexdigest()


def _tokenize_splits(docs: list[Document], tok, val_fraction: float, dtype, show: bool = True) -> tuple[dict, int, str]:
    """Token arrays of the train and validation documents (each ends with <|endoftext|>)."""
    eot = tok.token_to_id(EOT)
    splits: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    n_val_docs = 0
    chunk = 256
    with Progress(len(docs), "tokenize", "documents", show) as progress:
        for i in range(0, len(docs), chunk):
            batch = docs[i : i + chunk]
            for d, enc in zip(batch, tok.encode_batch([d.text for d in batch])):
                ids = enc.ids + ([eot] if eot is not None else [])
                is_val = _is_val(d.name, val_fraction)
                n_val_docs += is_val
                splits["val" if is_val else "train"].append(np.asarray(ids, dtype=dtype))
            progress.update(len(batch))
    arrays = {k: (np.concatenate(v) if v else np.zeros(0, dtype=dtype)) for k, v in splits.items()}
    split_rule = f"documents whose name hashes below {val_fraction}"
    if len(arrays["train"]) == 0 or len(arrays["val"]) == 0:
        # one document, or an unlucky hash: fall back to the last val_fraction of the token stream
        stream = np.concatenate([arrays["train"], arrays["val"]])
        cut = int(len(stream) * (1 - val_fraction))
        arrays = {"train": stream[:cut], "val": stream[cut:]}
        split_rule = f"the last {val_fraction} of the token stream"
    return arrays, n_val_docs, split_rule


def _write_cache(root: Path, final: Path, tok, arrays: dict, manifest: dict) -> None:
    """Build in a temporary folder beside the final one, then rename: never a half-written cache."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        tok.save(str(tmp / "tokenizer.json"))
        for split, arr in arrays.items():
            with open(tmp / f"{split}.bin", "wb") as f:
                f.write(arr.tobytes())
                f.flush()
                os.fsync(f.fileno())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same cache first; theirs is as good
            if not (final / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
