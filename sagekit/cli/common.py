"""The typer app and what every command shares: consoles, one-line errors, progress bars, model lookup."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from sagekit.errors import SagekitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SAGE-PTQ: ~1-bit compression and inference for Llama models, without PyTorch.")
err = Console(stderr=True)
out = Console()


def _print_version(value: bool) -> None:
    if value:
        from sagekit import __version__

        print(f"sagekit {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")) -> None:
    """SAGE-PTQ: ~1-bit compression and inference for Llama models, without PyTorch."""

MODEL_HELP = "Model folder (HF layout or a sagekit compressed folder) or a .safetensors file with config.json " \
             "and tokenizer.json beside it. Default: the built-in demo model (SmolLM2-135M-Instruct)."
DEVICE_HELP = "auto: CUDA when CuPy sees a GPU, else CPU; cpu: NumPy/Numba; cuda: CuPy (fails without a GPU)."


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Every expected failure becomes one line on stderr and a non-zero exit."""
    try:
        yield
    except SagekitError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except MemoryError:
        err.print("[bold red]error:[/] out of memory: use a smaller --seqlen / model, or a machine with more RAM")
        raise typer.Exit(1) from None


def progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)


def _resolve(model: Optional[str]) -> Path:
    from sagekit.io.demo import resolve_model

    return resolve_model(model, log=lambda m: err.print(f"[dim]{m}[/]"))


def _tokenizer(path: Path):
    from sagekit.model.tokenizer import load_tokenizer

    return load_tokenizer(path if path.is_dir() else path.parent)


def _model(path: Path, device: str, max_seq_len: int):
    from sagekit.backend import get_backend
    from sagekit.model.load import load_model

    return load_model(path, get_backend(device), max_seq_len)


def device_name(backend) -> str:
    """The backend's description, and, on the CPU, the precision prefills multiply at (kernels/tiles.py)."""
    if backend.is_gpu:
        return backend.describe()
    from sagekit.kernels import tiles

    int8 = f", int8 GEMM from {tiles.INT8_MIN_TOKENS} tokens" if tiles.INT8 else ""
    return backend.describe()[:-1] + int8 + ")"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
