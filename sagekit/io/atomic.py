"""Write a whole output folder under a temporary name and rename it at the end.

A crash, Ctrl-C, full disk or bad input then leaves no half-written output behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from sagekit.errors import DiskFullError, SagekitError


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing OUT unless forced, and an unwritable parent, before any long work starts."""
    if out_dir.exists() and not out_dir.is_dir():  # --force replaces a folder, never deletes a file
        raise SagekitError(f"{out_dir} is a file, not a folder: choose another output folder")
    if out_dir.exists() and not force:
        raise SagekitError(f"{out_dir} already exists: choose another output folder or pass --force to replace it")
    parent = out_dir.resolve().parent
    while not parent.exists():  # missing parents are created, like mkdir -p
        parent = parent.parent
    if not parent.is_dir():
        raise SagekitError(f"cannot write {out_dir}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise SagekitError(f"cannot write {out_dir}: no write permission in {parent}")


def write_error(e: OSError, target: Path) -> SagekitError:
    """The one-line error for an OSError met while writing `target`."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full while writing {target}: free space and run again")
    where = f" ({e.filename})" if e.filename else ""
    return SagekitError(f"cannot write {target}: {e.strerror}{where}")


def _remove_orphans(out_dir: Path) -> None:
    """Delete temporary folders left beside out_dir by runs that were killed (their process is gone)."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_folder(out_dir: Path, force: bool = False, tmp_dir: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir; on success it replaces out_dir, on failure it is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    _remove_orphans(out_dir)
    tmp = tmp_dir or out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as e:  # every one is about the disk or the path: a line for the user, not a traceback
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, out_dir) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
