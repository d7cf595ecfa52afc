"""`serve`: an OpenAI-compatible HTTP server for one model."""

from __future__ import annotations

import importlib.util
import ipaddress
import logging

import typer
from rich.markup import escape

from sagekit.cli.common import DEVICE_HELP, MODEL_HELP, _resolve, _user_errors, app, device_name, err
from sagekit.errors import SagekitError

SERVE_MISSING = "sagekit serve needs Starlette and uvicorn: pip install 'sagekit[serve]'"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


@app.command()
def serve(
    model: str | None = typer.Argument(None, help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on. Anything but a loopback address needs "
                             "--api-key."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(None, envvar="SAGEKIT_API_KEY", help="Clients must send 'Authorization: "
                                       "Bearer KEY' (the OpenAI clients' api_key). Also read from $SAGEKIT_API_KEY."),
    model_name: str | None = typer.Option(None, help="The model id clients name (default: the folder's name)."),
    context_length: int | None = typer.Option(None, min=2, help="Prompt plus completion tokens per request "
                                              "(default: the model's context)."),
    max_tokens: int = typer.Option(2048, min=1, help="Completion tokens one request may ask for."),
    max_queue: int = typer.Option(16, min=0, help="Requests that may wait while one is generated; more get 429."),
    max_body: int = typer.Option(2 ** 20, min=1024, help="Largest request body in bytes; larger ones get 413."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Serve a model over HTTP: POST /v1/chat/completions and /v1/completions (streamed with "stream": true),
    GET /v1/models and /health. Requests are answered one at a time, in order."""
    with _user_errors():
        if api_key is None and not is_loopback(host):
            raise SagekitError(f"serving on {host} opens the model to the network: give --api-key KEY (or set "
                               "SAGEKIT_API_KEY), or serve on 127.0.0.1")
        if api_key is not None and not api_key.strip():
            raise SagekitError("--api-key is empty: give a non-empty key")
        if any(importlib.util.find_spec(name) is None for name in ("starlette", "uvicorn")):
            raise SagekitError(SERVE_MISSING)
        import uvicorn

        from sagekit.api import load
        from sagekit.serve.app import Settings, create_app
        from sagekit.serve.protocol import Limits

        m = load(_resolve(model), device, context_length)
        settings = Settings(model_id=model_name or m.name, api_key=api_key, max_queue=max_queue, max_body=max_body,
                            limits=Limits(max_tokens=max_tokens, context_length=m.context_length))
        err.print(escape(f"serving {settings.model_id} ({m.path}) on http://{host}:{port}/v1 - context "
                         f"{m.context_length} tokens, {device_name(m.llm.backend)}"), highlight=False)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("sagekit.serve").addHandler(handler)  # beside uvicorn's own lines
        logging.getLogger("sagekit.serve").setLevel(logging.INFO)
        uvicorn.run(create_app(m, settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
