"""An OpenAI-compatible HTTP server for one model (`sagekit serve`): protocol (the wire format), worker (the
queue in front of the model) and app (Starlette routes). Needs the `serve` extra (Starlette, uvicorn)."""
