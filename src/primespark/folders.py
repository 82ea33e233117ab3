"""Private folders (state, rendered configs): made 0700 by us, or used as they are when already private.

The mode of a folder the project did not create is never changed: `SPARK_STATE_DIR=/tmp` or `--out ~` must not
turn /tmp or a home folder into 0700. Every failure is a `UserError` naming the path and what to do.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from primespark.errors import UserError


class SharedFolder(UserError):
    """The folder exists, was not made by us and others can read it (or someone else owns it)."""


def _check_existing(path: Path, what: str, fix: str) -> Path:
    try:
        info = path.stat()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be read: {exc.strerror}", fix) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} {path} is a file, not a folder", fix)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise SharedFolder(f"{what} {path} is open to other users (mode {stat.S_IMODE(info.st_mode):04o}, owner uid "
                           f"{info.st_uid}) and was not made by spark, which does not change the mode of folders it "
                           "did not make", fix)
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path} is not writable", fix)
    return path


def private_folder(path: Path, what: str, fix: str, *, make_parents: bool = False) -> Path:
    """`path` as a private folder: made (0700) when missing, used as it is when it is already private (ours,
    0700 or stricter); anything else raises (`SharedFolder` for a folder open to others)."""
    if not path.exists():
        try:
            if make_parents:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.mkdir(mode=0o700)
            path.chmod(0o700)  # ours: the umask may have left it stricter, never looser
            return path
        except FileExistsError:
            pass  # made meanwhile by another process: checked below as an existing folder
        except FileNotFoundError:
            raise UserError(f"{what} {path} cannot be made: its parent folder {path.parent} does not exist",
                            fix) from None
        except NotADirectoryError:
            raise UserError(f"{what} {path} cannot be made: a file stands on its path", fix) from None
        except OSError as exc:
            raise UserError(f"{what} {path} cannot be made: {exc.strerror}", fix) from None
    return _check_existing(path, what, fix)
