"""The one exception type for user mistakes.

A `UserError` carries a one-line message that names the problem and the fix. The CLI prints it
without a traceback and exits non-zero; everything else (a bug) keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a config, a path, a flag. The message says what to change."""


import errno as _errno

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
