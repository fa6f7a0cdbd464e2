"""Corpus sources: where documents come from."""

from __future__ import annotations

import glob
import os
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from minigpt.core.config import DataConfig
from minigpt.core.errors import UserError
from minigpt.core.progress import Progress

BYTE_ALPHABET = 256  # byte-level BPE starts from one token per byte

DATA_FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    name: str
    text: str


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
    try:
        import datasets
    except ImportError:
        raise UserError(f"data.source = {cfg.source!r} is read with the datasets package, which the core install "
                        f"leaves out: pip install 'minigpt[data]' (plain text files and folders need nothing)") from None

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
