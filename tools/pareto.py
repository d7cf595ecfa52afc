"""Sweep methods x knobs on one model; write the Pareto table (RESULTS.md), the raw rows and the plot.

Every configuration goes through sagekit's own compress() and is scored by evaluate() against the FP16
reference in the same pass (perplexity, KL(reference || model), top-1 agreement), so rows differ only in the
method. Columns: paper-style bits are what each method's paper counts (weight bits + the scale bits it
admits to; see each sagekit.quant module's docstring), true bits are 8 x stored bytes / weights, for the
decoder linear layers and for the whole file. The Pareto frontier is taken over (linear true bits, ppl).

    python tools/pareto.py                                   # the full protocol: hours on a CPU
    python tools/pareto.py --max-windows 1 --calib-samples 4 --calib-seqlen 256 --methods rtn,pbllm --out /tmp/p

matplotlib comes from the optional `plot` extra (pip install -e '.[plot]'); without it the plot is skipped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.backend import get_backend
from sagekit.eval.perplexity import evaluate, read_text
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.demo import demo_model
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant.calibration import CalibOptions
from sagekit.quant.compress import CALIBRATED, CompressOptions, compress
from sagekit.quant.sage import SageKnobs

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"

# (method, knobs label, CompressOptions fields other than method/calib)
SWEEP: list[tuple[str, str, dict[str, Any]]] = [
    ("rtn", "-", {}),
    ("q1", "block 128", {}),
    ("billm", "block 128", {}),
    ("pbllm", "fraction 0.05", {"baseline_knobs": {"fraction": 0.05}}),
    ("pbllm", "fraction 0.1", {"baseline_knobs": {"fraction": 0.1}}),
    ("pbllm", "fraction 0.2", {"baseline_knobs": {"fraction": 0.2}}),
    ("sage", "rate-penalty 0.2", {}),
    ("sage", "rate-penalty 0.05", {"knobs": SageKnobs(rate_penalty=0.05)}),
    ("sage", "target-bpw 1.5", {"target_bpw": 1.5}),
    ("sage", "target-bpw 2.0", {"target_bpw": 2.0}),
]


def pareto_front(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of rows no other row beats on both linear true bits and ppl (lower is better for both)."""
    front = set()
    for i, a in enumerate(rows):
        if not any(b["linear_true_bpw"] <= a["linear_true_bpw"] and b["ppl"] <= a["ppl"]
                   and (b["linear_true_bpw"], b["ppl"]) != (a["linear_true_bpw"], a["ppl"]) for b in rows):
            front.add(i)
    return front


def run_sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    src = Path(args.model) if args.model else demo_model()
    backend = get_backend(args.device)
    tok = load_tokenizer(src if src.is_dir() else src.parent)
    ids = np.asarray(tok.encode(read_text(args.text)).ids, dtype=np.int64)
    ref = load_model(src, backend, args.seqlen)
    with Checkpoint(src) as ckpt:
        fp16 = evaluate(ref, ids, args.seqlen, args.max_windows)
        params = sum(int(np.prod(s)) for s in ckpt.config.expected_shapes().values())
        rows = [{"method": "fp16", "knobs": "-", "paper_bits": 16.0, "linear_true_bpw": 16.0,
                 "file_true_bpw": 8.0 * ckpt.file_bytes / params, "file_bytes": ckpt.file_bytes, "ppl": fp16.ppl,
                 "kl": 0.0, "top1": 1.0, "seconds": 0.0}]
    calib = CalibOptions(args.calib, args.calib_samples, args.calib_seqlen, args.calib_seed)
    work = Path(tempfile.mkdtemp(prefix="pareto-", dir=args.out))
    try:
        for method, label, fields in SWEEP:
            if method not in args.methods:
                continue
            print(f"{method} {label}: compress", file=sys.stderr, flush=True)
            opts = CompressOptions(method=method, calib=calib if method in CALIBRATED else None, device=args.device,
                                   workers=args.workers, **fields)
            folder = work / f"{method}-{label.replace(' ', '')}"
            t0 = time.perf_counter()
            t = compress(src, folder, opts)["totals"]
            seconds = time.perf_counter() - t0
            print(f"{method} {label}: eval", file=sys.stderr, flush=True)
            r = evaluate(load_model(folder, backend, args.seqlen), ids, args.seqlen, args.max_windows, reference=ref)
            rows.append({"method": method, "knobs": label,
                         "paper_bits": t["linear_paper_bits"] + t["linear_paper_scale_bits"],
                         "linear_true_bpw": t["linear_true_bpw"], "file_true_bpw": t["file_true_bpw"],
                         "file_bytes": t["file_bytes"], "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "seconds": seconds})
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    setup = {"model": str(src), "text": str(args.text), "seqlen": args.seqlen, "windows": fp16.windows,
             "tokens": fp16.tokens, "calib": str(args.calib), "calib_samples": args.calib_samples,
             "calib_seqlen": args.calib_seqlen, "calib_seed": args.calib_seed, "device": backend.describe(),
             "date": time.strftime("%Y-%m-%d")}
    return rows, setup


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    front = pareto_front(rows)
    lines = [
        "# Results: SAGE-PTQ against the baselines, one harness",
        "",
        f"Model `{Path(setup['model']).name}`; perplexity on `{Path(setup['text']).name}`, {setup['windows']} windows "
        f"of {setup['seqlen']} tokens ({setup['tokens']} scored); KL(FP16 || model) per token and top-1 agreement "
        f"in the same pass. billm/pbllm calibrate on `{Path(setup['calib']).name}`: {setup['calib_samples']} windows "
        f"of {setup['calib_seqlen']} tokens, seed {setup['calib_seed']}. {setup['device']}, {setup['date']}. "
        "Produced by `tools/pareto.py`.",
        "",
        "Paper bits: what each method's paper counts (sage: weight + scaling bits; rtn, q1: sign + scales; billm: "
        "1 + salient-column share; pbllm: 1 + 7 x salient share). True bits: 8 x stored bytes / weights. "
        "**Bold** rows are on the Pareto frontier of perplexity vs linear true bits.",
        "",
        "| method | knobs | paper bits | true bits (linear) | true bits (file) | file bytes | ppl | KL | top-1 "
        "| compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        b = "**" if i in front else ""
        lines.append(f"| {b}{r['method']}{b} | {r['knobs']} | {r['paper_bits']:.3f} | {b}{r['linear_true_bpw']:.3f}{b} "
                     f"| {r['file_true_bpw']:.3f} | {r['file_bytes']:,} | {b}{r['ppl']:.2f}{b} | {r['kl']:.4f} "
                     f"| {r['top1']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written", file=sys.stderr)
        return False
    front = sorted((rows[i] for i in pareto_front(rows)), key=lambda r: r["linear_true_bpw"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["linear_true_bpw"] for r in pts], [r["ppl"] for r in pts], label=method, s=30)
    ax.plot([r["linear_true_bpw"] for r in front], [r["ppl"] for r in front], "k--", lw=0.8, label="Pareto frontier")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight (decoder linear layers)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="FP16 model folder (default: the demo model)")
    p.add_argument("--text", type=Path, default=DATA / "wiki.test.txt")
    p.add_argument("--calib", type=Path, default=DATA / "wiki.valid.tokens", help="never the evaluation text")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=2048)
    p.add_argument("--calib-seed", type=int, default=0)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--methods", default="rtn,q1,billm,pbllm,sage", help="comma-separated subset of the sweep")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = p.parse_args()
    args.methods = set(args.methods.split(","))
    if args.text.resolve() == args.calib.resolve():
        p.error("--calib must not be the evaluation text")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, setup = run_sweep(args)
    (args.out / "results.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    (args.out / "RESULTS.md").write_text(markdown(rows, setup))
    plot(rows, args.out / "pareto.png")
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
