"""Reading files someone else may have written (torch-free): a run directory, a config, a table.

Every file minigpt reads back is untrusted input. `read_regular` opens it once, without following a link
and without blocking (a FIFO or a device is refused at open, never waited on), checks that it is a regular
file under a size limit, and returns its bytes; whatever is parsed, hashed or loaded is those bytes, so a
file swapped between a check and a load is never the one loaded.

A committed checkpoint folder carries its own record, `files.json` ({"step", "files": {name: {"bytes",
"sha256"}}}), written inside the folder before it is renamed into place (run/files.py). `read_verified`
returns a checkpoint file's bytes only when it is listed there and its size and SHA-256 match; a folder
from before the record is read against latest.json's, when latest.json names it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path, PurePosixPath

from minigpt.core.errors import UserError

RECORD = "files.json"
LATEST = "latest.json"
MAX_RECORD_BYTES = 16 << 20  # a checkpoint's file list (DeepSpeed's shards: thousands of names at most)
MAX_CHECKPOINT_FILE = 1 << 44  # 16 TiB: a bound on a weights file's size, so a crafted record cannot ask for more


def _open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of `path`, opened without following a link and without blocking (a FIFO opens at
    once and is refused here), in blocking mode again; one line naming the file when it is missing, a link, or not
    a regular file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{what} {path} is a symbolic link; minigpt reads it only as a regular file: replace the "
                            f"link with the file") from None
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device or socket"
        raise UserError(f"{what} {path} is {kind}, not a regular file: it was not read (replace it with the file)")
    os.set_blocking(fd, True)
    return fd


def read_regular(path: Path, what: str, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes`; one line naming it otherwise (missing, a
    symbolic link, a FIFO, device or folder, too large, unreadable). Never blocks on a FIFO."""
    path = Path(path)
    fd = _open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise UserError(f"{what} {path} is {size:,} bytes, over the {max_bytes:,} such a file can be: it was "
                            f"not read (give the right file)")
        return _read_fd(fd, max_bytes, f"{what} {path}")
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _read_fd(fd: int, max_bytes: int, name: str) -> bytes:
    chunks, total = [], 0
    while chunk := os.read(fd, 1 << 20):
        total += len(chunk)
        if total > max_bytes:  # it grew while being read
            raise UserError(f"{name} grew past {max_bytes:,} bytes while being read: it was not read")
        chunks.append(chunk)
    return b"".join(chunks)


def check_regular(path: Path, what: str) -> None:
    """Refuse, in one line and without blocking, a path that is not a regular file (a link, FIFO, device or
    folder): for large files a library then reads by path itself."""
    os.close(_open_regular(Path(path), what))


def digest_file(path: Path, what: str) -> dict:
    """The size and SHA-256 of a regular file, read in blocks (a check before work; what is loaded later is
    verified again on its own bytes)."""
    fd = _open_regular(Path(path), what)
    try:
        h, size = hashlib.sha256(), 0
        while block := os.read(fd, 1 << 20):
            h.update(block)
            size += len(block)
        return {"bytes": size, "sha256": h.hexdigest()}
    finally:
        os.close(fd)


def digest(data: bytes) -> dict:
    """The record of a file's content: its size and SHA-256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_record(files, where: str) -> dict:
    """A checkpoint's file record, each entry checked: a plain relative name inside the folder, a size and a
    SHA-256. UserError naming `where` otherwise."""
    if not isinstance(files, dict):
        raise UserError(f"{where} is corrupt: it has no file list; the checkpoint cannot be loaded from it")
    for fname, rec in files.items():
        parts = PurePosixPath(fname).parts if isinstance(fname, str) else ()
        if not parts or fname.startswith("/") or any(p in ("..", ".", "") for p in parts) or "\\" in fname:
            raise UserError(f"{where} is corrupt: it lists a file outside its checkpoint folder; the checkpoint cannot "
                            f"be loaded from it")
        if not (isinstance(rec, dict) and isinstance(rec.get("bytes"), int) and not isinstance(rec["bytes"], bool)
                and 0 <= rec["bytes"] <= MAX_CHECKPOINT_FILE and isinstance(rec.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
            raise UserError(f"{where} is corrupt: the record of {fname} is not a size and a SHA-256")
    return files


def folder_record(folder: Path) -> dict:
    """{name: {bytes, sha256}} of a committed checkpoint folder: its own files.json, or (a folder written
    before the record existed) the run's latest.json when that names this folder."""
    folder = Path(folder)
    own = folder / RECORD
    if os.path.lexists(own):
        raw = _json(read_regular(own, "checkpoint record", MAX_RECORD_BYTES), own)
        return check_record(raw.get("files"), str(own))
    latest = folder.parent.parent / LATEST
    if folder.parent.name == "checkpoints" and os.path.lexists(latest):
        raw = _json(read_regular(latest, "checkpoint pointer", MAX_RECORD_BYTES), latest)
        if raw.get("dir") == f"checkpoints/{folder.name}":
            return check_record(raw.get("files"), str(latest))
    raise UserError(f"checkpoint {folder} has no record of its files ({RECORD}, or latest.json naming it): it cannot be "
                    f"verified, so it was not loaded (load the run's latest checkpoint)")


def _json(data: bytes, path: Path) -> dict:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{path} is corrupt ({type(e).__name__}); the checkpoint cannot be loaded from it") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is corrupt: not a JSON object; the checkpoint cannot be loaded from it")
    return raw


def read_verified(folder: Path, name: str, record: dict | None = None) -> bytes:
    """The bytes of checkpoint file `name`, only if the folder's record lists it with this size and SHA-256."""
    folder = Path(folder)
    record = folder_record(folder) if record is None else record
    expected = record.get(name)
    if expected is None:
        raise UserError(f"checkpoint {folder} has no record of {name}: a file its record does not list is never "
                        f"loaded (restore the checkpoint, or load another step)")
    data = read_regular(folder / name, "checkpoint file", expected["bytes"])
    found = digest(data)
    if found != expected:
        raise UserError(f"checkpoint file {folder / name} is corrupt ({found['bytes']:,} bytes, expected "
                        f"{expected['bytes']:,} with a different SHA-256); it was not loaded")
    return data


MAX_JSONL_LINE = 1 << 20  # a metrics record is a few hundred bytes; a longer line is damage, skipped


def iter_jsonl(path: Path, what: str):
    """The JSON-object records of a JSON-lines file, streamed line by line (a file of any size in constant
    memory); a line that is not a JSON object (a last line cut short by a kill, damage) is skipped. A missing
    file has none; a link, FIFO, device or folder is refused in one line."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    fd = _open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        for line in f:
            if len(line) > MAX_JSONL_LINE:
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                yield record
