"""N concurrent streaming clients against a running `sagekit serve`, for T seconds: correctness under load first,
then latency and throughput.

Why: a server that answers one request at a time can still go wrong under concurrency: a reply streamed to
the wrong client, a stream cut short, a request that never comes back. Each client asks seeded chat
requests drawn from a fixed set of distinct prompts; a (prompt, seed) pair always gives the same reply, so
every reply must equal every other reply to the same prompt (a crossed stream would not), every stream must
end with a finish reason, usage and [DONE] under one id of its own, and every request sent must come back
as a reply or a 429 refusal. It reports p50/p95 latency (whole reply and first token), tokens/s and refusals,
and exits 1 if any check fails.

    sagekit serve MODEL --port 8000 &
    python tools/load_test.py --url http://127.0.0.1:8000 [--clients 8] [--seconds 30] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

WORDS = ("river", "lantern", "copper", "orchard", "glacier", "violin", "harbor", "meadow", "comet", "library",
         "desert", "falcon", "bakery", "volcano", "compass", "garden", "tunnel", "island", "engine", "forest")


@dataclass
class Outcome:
    prompt: int
    status: int
    text: str = ""
    ids: set[str] = field(default_factory=set)
    finish: str | None = None
    tokens: int = 0
    done: bool = False
    first_token_s: float | None = None
    seconds: float = 0.0
    error: str = ""


def prompts(n: int, seed: int) -> list[str]:
    """n distinct prompts from a seeded draw of word pairs."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        p = "Write one sentence about a {} and a {}.".format(*rng.sample(WORDS, 2))
        if p not in out:
            out.append(p)
    return out


def ask(client: httpx.Client, url: str, model: str, prompt: str, index: int, max_tokens: int) -> Outcome:
    """One streamed chat request; what came back, parsed as it arrived."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": index, "stream": True, "stream_options": {"include_usage": True}}
    t0, out = time.perf_counter(), Outcome(prompt=index, status=0)
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            out.status = r.status_code
            if r.status_code != 200:
                r.read()
                out.error = r.text[:200]
                return out
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    out.done = True
                    continue
                chunk = json.loads(line[6:])
                out.ids.add(chunk.get("id", "?"))
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content") or ""
                    if piece and out.first_token_s is None:
                        out.first_token_s = time.perf_counter() - t0
                    out.text += piece
                    out.finish = choice.get("finish_reason") or out.finish
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        out.error = f"{type(e).__name__}: {e}"
    out.seconds = time.perf_counter() - t0
    return out


def client_loop(url: str, model: str, texts: list[str], seed: int, deadline: float, max_tokens: int,
                headers: dict[str, str], results: list[Outcome], lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(headers=headers, timeout=httpx.Timeout(600.0)) as client:
        while time.perf_counter() < deadline:
            i = rng.randrange(len(texts))
            out = ask(client, url, model, texts[i], i, max_tokens)
            with lock:
                results.append(out)
            if out.status == 429:
                time.sleep(0.5)  # refused: back off, as a client should


def check(results: list[Outcome], max_tokens: int) -> list[str]:
    """Every failed check, in words (empty: all good)."""
    problems, by_prompt, seen_ids = [], {}, set()
    for n, r in enumerate(results):
        if r.status == 429:
            continue
        if r.status != 200 or r.error:
            problems.append(f"request {n}: status {r.status} {r.error}")
            continue
        if len(r.ids) != 1 or r.ids & seen_ids:
            problems.append(f"request {n}: stream ids {sorted(r.ids)} are not one id of its own")
        seen_ids |= r.ids
        if not r.done or r.finish not in ("stop", "length") or (r.finish == "length" and r.tokens != max_tokens):
            problems.append(f"request {n}: incomplete (done={r.done}, finish={r.finish}, tokens={r.tokens})")
        by_prompt.setdefault(r.prompt, set()).add(r.text)
    problems += [f"prompt {p}: {len(t)} different replies to the same seeded request" for p, t in by_prompt.items()
                 if len(t) > 1]
    return problems


def percentile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [None])[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts the clients draw from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(args.url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    texts, results, lock = prompts(args.prompts, args.seed), [], threading.Lock()
    start = time.perf_counter()
    deadline = start + args.seconds
    threads = [threading.Thread(target=client_loop, args=(args.url, model, texts, args.seed * 1000 + c, deadline,
                                                          args.max_tokens, headers, results, lock))
               for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    problems = check(results, args.max_tokens)
    ok = [r for r in results if r.status == 200 and not r.error]
    tokens = sum(r.tokens for r in ok)
    first = [r.first_token_s for r in ok if r.first_token_s is not None]
    report = {
        "model": model, "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
        "wall_seconds": round(wall, 1), "requests": len(results), "replies": len(ok),
        "refused_429": sum(r.status == 429 for r in results), "failed": len(results) - len(ok) -
        sum(r.status == 429 for r in results), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": percentile([r.seconds for r in ok], 50), "latency_p95_s": percentile([r.seconds for r in ok], 95),
        "first_token_p50_s": percentile(first, 50), "first_token_p95_s": percentile(first, 95),
        "distinct_prompts_answered": len({r.prompt for r in ok}), "problems": problems,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for k, v in report.items():
            if k != "problems":
                print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
        print("checks: " + ("all passed" if not problems else f"{len(problems)} FAILED"))
        for p in problems[:20]:
            print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
