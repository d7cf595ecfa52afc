"""One model, one thread: requests are generated in turn, and at most `max_queue` of them wait.

The model has one KV cache and the CPU kernels use every core, so two replies at once would only slow
each other down; requests queue instead. A full queue refuses at once (429) rather than letting latency
grow without bound. The worker thread hands each text piece to the request's event loop as it comes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from sagekit.api import Model
from sagekit.serve.protocol import ApiError, Request

log = logging.getLogger("sagekit.serve")


class Job:
    """A request in the queue: the worker puts ("piece", text), then ("done", reply) or ("error", exc)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = False  # set by the client's side when it goes away: the worker stops at the next token

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed (the server is shutting down): nobody is listening
            self.cancelled = True


class Worker:
    def __init__(self, model: Model, max_queue: int):
        self.model, self.max_queue = model, max_queue
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self.in_flight = 0  # the request being generated, if any, and those waiting
        threading.Thread(target=self._run, name="sagekit-worker", daemon=True).start()

    @property
    def waiting(self) -> int:
        """Requests queued behind the one being generated."""
        return max(self.in_flight - 1, 0)

    def submit(self, request: Request) -> Job:
        """Queue a request (called on the event loop); a full queue refuses it with 429."""
        with self._lock:
            if self.in_flight > self.max_queue:
                raise ApiError(429, f"the server is busy: one reply is being generated and {self.waiting} "
                               "requests are waiting; retry shortly", type="requests", code="rate_limit_exceeded")
            self.in_flight += 1
        job = Job(request, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if not job.cancelled:
                self._generate(job)
            with self._lock:
                self.in_flight -= 1

    def _generate(self, job: Job) -> None:
        r = job.request
        try:
            reply = self.model.start(r.prompt_ids, r.max_tokens, r.temperature, r.top_p, r.seed, r.stop)
            for piece in reply:
                if job.cancelled:
                    reply.close()
                    log.info("%s: the client went away; stopped after %d tokens", r.id, reply.completion_tokens)
                    return
                job.put("piece", piece)
            job.put("done", reply)
        except Exception as e:  # the server must outlive any one request; the client gets a 500
            log.exception("request %s failed", r.id)
            job.put("error", e)
