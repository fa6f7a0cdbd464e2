"""The one exception type for user mistakes.

A `UserError` carries a one-line message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero; everything else (a bug) keeps its traceback.
"""


import errno as _errno
import shutil as _shutil
from pathlib import Path as _Path


class UserError(ValueError):
    """Bad input from the user: a config, a path, a flag. The message says what to change."""


_FIXES = {
    _errno.ENOSPC: "free disk space or write elsewhere",
    _errno.EDQUOT: "the disk quota is full: free space or write elsewhere",
    _errno.EROFS: "the file system is read-only: write elsewhere (e.g. another train.out_dir)",
    _errno.EACCES: "no permission: write elsewhere or fix the permissions",
    _errno.EPERM: "not permitted: write elsewhere or fix the permissions",
    _errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    _errno.EEXIST: "a file of that name is in the way: choose another path",
    _errno.EISDIR: "it is a directory: give a file",
    _errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    _errno.ENOENT: "it does not exist: check the path",
}


def os_error(e: OSError) -> UserError | None:
    """An OSError the user can fix (disk full, read-only, permissions, a file in the way...) as a
    one-line UserError naming the path and the fix; None for other errors (bugs)."""
    if e.errno not in _FIXES:
        return None
    path = e.filename or "a file"
    return UserError(f"{path}: {e.strerror or 'error'}; {_FIXES[e.errno]}")


# what torch, safetensors, tokenizers and numpy say when a write fails (they raise RuntimeError and kin, with
# the OS's words inside, rather than an OSError carrying errno)
_WRITE_WORDS = {"no space left": _errno.ENOSPC, "disk quota": _errno.EDQUOT, "read-only file system": _errno.EROFS,
                "permission denied": _errno.EACCES, "file write failed": _errno.ENOSPC, "failed writing": _errno.ENOSPC,
                "write failed": _errno.ENOSPC, "unexpected pos": _errno.ENOSPC}


def write_error(e: BaseException, path) -> UserError | None:
    """A failed write of `path` (an OSError, or a library's RuntimeError about one) as a one-line UserError
    naming the path, what happened and the fix; None when the error is not about writing (a bug)."""
    if isinstance(e, OSError) and e.errno in _FIXES:
        return UserError(f"cannot write {path}: {e.strerror or 'error'}; {_FIXES[e.errno]}")
    text = str(e).lower()
    code = next((c for words, c in _WRITE_WORDS.items() if words in text), None)
    if code is None:
        return None
    if code == _errno.ENOSPC and not _disk_full(_Path(path)):
        return UserError(f"cannot write {path}: {str(e).splitlines()[0][:200]}; check the disk, then retry")
    return UserError(f"cannot write {path}: {_FIXES[code]}")


def _disk_full(path: _Path) -> bool:
    for folder in (path, *path.parents):
        try:
            return _shutil.disk_usage(folder).free < 64 << 20
        except OSError:
            continue
    return True
