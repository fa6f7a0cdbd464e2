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

import glob
import hashlib
import json
import math
import os
import queue
import shutil
import socket
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from minigpt.config import DataConfig, ModelConfig
from minigpt.errors import UserError
from minigpt.progress import Progress

EOT = "<|endoftext|>"
BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte
DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
FORMAT_VERSION = 2  # bump when the prepared layout changes, to invalidate old caches (2: relative names)
PINNED = ("source", "inputs_sha256", "num_documents", "num_chars", "tokenizer")  # what a resumed run must find again
VERIFY_HASH_BYTES = 256 << 20  # token files up to this size are re-hashed before reuse


@dataclass
class Document:
    name: str
    text: str


@dataclass
class PreparedData:
    """Token files on disk plus what a user should know about them."""

    path: Path
    manifest: dict
    tokenizer_path: Path
    reused: bool

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r")

    def load_tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.tokenizer_path))

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
# sources


def stdlib_files() -> list[Path]:
    """The standard library's .py files, sorted, without test packages or installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_DIRS.isdisjoint(path.relative_to(root).parts[:-1]):
            files.append(path)
    return files


def local_files(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(source, recursive=True))]
    else:
        paths = [Path(source)]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                p for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
    return files


def source_root(source: str) -> Path:
    """What document names are relative to: the directory, the file's folder, or a glob's fixed prefix."""
    fixed = Path(source.split("*")[0].split("?")[0].split("[")[0]) if any(c in source for c in "*?[") else Path(source)
    return fixed if fixed.is_dir() else fixed.parent


def _relative_name(path: Path, root: Path | None) -> str:
    if root is None:
        return str(path)
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _read_text_files(files: list[Path], max_chars: int, root: Path | None = None,
                     show: bool = True) -> tuple[list[Document], int]:
    """Documents named by their path relative to `root`, so the same corpus elsewhere splits the same."""
    docs, skipped, total = [], 0, 0
    with Progress(len(files), "read corpus", "files", show) as progress:
        for path in files:
            progress.update()
            try:
                text = path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped += 1
                continue
            if not text.strip():
                continue
            docs.append(Document(_relative_name(path, root), text))
            total += len(text)
            if max_chars and total >= max_chars:
                break
    return docs, skipped


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _dataset_documents(cfg: DataConfig) -> tuple[list[Document], int]:
    import datasets

    source = cfg.source
    label = source
    try:
        if source.startswith("hf:"):
            name = source[3:]
            if not _hub_reachable():
                # offline: the local datasets cache may still hold it; never wait on retries
                os.environ["HF_HUB_OFFLINE"] = "1"
                os.environ["HF_DATASETS_OFFLINE"] = "1"
            try:
                ds = datasets.load_dataset(name, cfg.hf_config or None, split=cfg.hf_split)
            except Exception as e:  # datasets raises many types for a missing dataset
                offline = os.environ.get("HF_HUB_OFFLINE") == "1"
                why = "the Hub is unreachable (offline) and it is not in the local cache" if offline else str(e).splitlines()[0]
                raise UserError(
                    f"cannot load dataset {name!r}: {why}; give a local path instead "
                    f"(data.source=path/to/text, a .jsonl/.parquet file or a save_to_disk folder)"
                ) from None
        elif _is_saved_dataset(Path(source)):
            ds = datasets.load_from_disk(source)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.hf_split not in ds:
                    raise UserError(
                        f"{source} has splits {list(ds)}, not data.hf_split = {cfg.hf_split!r}; set data.hf_split"
                    )
                ds = ds[cfg.hf_split]
        else:
            fmt = DATA_FILE_FORMATS[Path(source).suffix.lower()]
            ds = datasets.load_dataset(fmt, data_files=source, split="train")
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read dataset {source}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if cfg.text_column not in ds.column_names:
        raise UserError(
            f"{label} has no column {cfg.text_column!r}; its columns are {ds.column_names}: set data.text_column"
        )
    docs, total = [], 0
    for i, text in enumerate(ds[cfg.text_column]):
        if isinstance(text, str) and text.strip():
            docs.append(Document(f"#{i}", text))
            total += len(text)
            if cfg.max_chars and total >= cfg.max_chars:
                break
    return docs, 0


def load_documents(cfg: DataConfig, show: bool = True) -> tuple[list[Document], int]:
    """Return (documents, number of files skipped as not UTF-8). Raises UserError when empty."""
    source = cfg.source
    if source == "stdlib":
        docs, skipped = _read_text_files(stdlib_files(), cfg.max_chars, Path(sysconfig.get_paths()["stdlib"]), show)
    elif source.startswith("hf:") or _is_saved_dataset(Path(source)) or (
        Path(source).is_file() and Path(source).suffix.lower() in DATA_FILE_FORMATS
    ):
        docs, skipped = _dataset_documents(cfg)
    else:
        files = local_files(source)
        if not files:
            raise UserError(
                f"data.source = {source!r} matches no file: give an existing file, directory or glob, "
                f"or 'stdlib' for the embedded default corpus"
            )
        docs, skipped = _read_text_files(files, cfg.max_chars, source_root(source), show)
    if not docs:
        if skipped:
            raise UserError(
                f"data.source = {source!r} has no decodable text: {skipped} file(s), none valid UTF-8; "
                f"give UTF-8 text files"
            )
        raise UserError(f"data.source = {source!r} is empty: no non-blank text; give a corpus with text in it")
    return docs, skipped


# ----------------------------------------------------------------------------------------------
# tokenizer


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
    _write_cache(root, final, tok, arrays, manifest)
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


# ----------------------------------------------------------------------------------------------
# batches


def check_split_length(tokens: np.ndarray, split: str, seq_len: int) -> None:
    if len(tokens) < seq_len + 2:
        raise UserError(
            f"the {split} split has {len(tokens):,} tokens, too few for windows of {seq_len + 1}: "
            f"use a larger corpus, a larger data.val_fraction, or a smaller model.block_size"
        )


def window_starts(num_tokens: int, batch_size: int, seq_len: int, key: tuple[int, ...]) -> np.ndarray:
    """Random window starts, a pure function of `key` (seed, split, step, rank, micro-step)."""
    rng = np.random.default_rng(key)
    return rng.integers(0, num_tokens - seq_len - 1, size=batch_size)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, key: tuple[int, ...]):
    """Inputs and next-token targets, each (batch_size, seq_len) int64 torch tensors on CPU."""
    starts = window_starts(len(tokens), batch_size, seq_len, key)
    windows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1], w[:, 1:]


def iter_train_keys(seed: int, step: int, rank: int, accum: int) -> Iterator[tuple[int, ...]]:
    """Batch keys of one optimizer step on one rank: different on each rank and micro-step.

    Keys number the micro-batches of the whole global batch (rank * accum + micro), so the
    same global batch is drawn whatever the split between ranks and accumulation: 2 ranks x 1
    micro-batch see exactly the data of 1 rank x 2 accumulated micro-batches.
    """
    for micro in range(accum):
        yield (seed, 0, step, rank * accum + micro)


def val_key(seed: int, i: int, rank: int) -> tuple[int, ...]:
    return (seed, 1, i, rank)


class BatchLoader:
    """The micro-batches of every step, built one step ahead in a background thread.

    While step s runs, the thread draws step s+1's windows (a pure function of seed, step, rank
    and micro-step, so prefetching changes nothing) and, on CUDA, pins them; the loop copies them
    with non_blocking=True. Iterate to get each step's list of (x, y) on `device`, in step order.
    """

    def __init__(self, tokens: np.ndarray, micro_batch: int, seq_len: int, seed: int, rank: int, accum: int,
                 steps: range, device: torch.device, depth: int = 2) -> None:
        self.tokens, self.micro_batch, self.seq_len = tokens, micro_batch, seq_len
        self.seed, self.rank, self.accum, self.steps, self.device = seed, rank, accum, steps, device
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="minigpt-batches", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        pin = self.device.type == "cuda"
        try:
            for step in self.steps:
                batch = [get_batch(self.tokens, self.micro_batch, self.seq_len, key)
                         for key in iter_train_keys(self.seed, step, self.rank, self.accum)]
                if pin:
                    batch = [(x.pin_memory(), y.pin_memory()) for x, y in batch]
                while not self.stop.is_set():
                    try:
                        self.queue.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the loop, which raises it
            self.queue.put(e)

    def __iter__(self):
        for _ in self.steps:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in item]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
