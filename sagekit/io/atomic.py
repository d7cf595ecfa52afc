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

from sagekit.errors import SagekitError


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


@contextlib.contextmanager
def atomic_folder(out_dir: Path, force: bool = False, tmp_dir: Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside out_dir; on success it replaces out_dir, on failure it is removed."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
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
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SagekitError(f"disk full while writing {out_dir}: free space and run again") from None
        where = f" ({e.filename})" if e.filename else ""
        raise SagekitError(f"cannot write {out_dir}: {e.strerror}{where}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
