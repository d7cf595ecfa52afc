"""Reading a user's text file (evaluation text, calibration text) with one clear error for each way it fails."""

from __future__ import annotations

from pathlib import Path

from sagekit.errors import SagekitError


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SagekitError(f"text file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise SagekitError(f"{path} is not UTF-8 text (byte {e.start}): convert it first") from None
    except OSError as e:
        raise SagekitError(f"cannot read {path}: {e.strerror}") from None
