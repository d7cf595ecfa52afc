"""Sweep methods x knobs on one model; write the Pareto table into RESULTS.md, the raw rows and the plot.

Every configuration goes through sagekit's own compress(); then every compressed model is scored in one pass
over the windows: each window runs the FP16 reference once and every model on it (perplexity,
KL(reference || model), top-1 agreement), so rows differ only in the method. The run is resumable: the
compressed folders and each scored window's sums live in --work, and a rerun (same protocol)
carries on where the last one stopped. Columns: paper-style bits are what each method's paper counts
(weight bits + the scale bits it admits to; see each sagekit.quant module's docstring), true bits are
8 x stored bytes / weights, for the decoder linear layers and for the whole file. The Pareto frontier is
taken over (linear true bits, ppl).

    python tools/pareto.py --work /data/pareto                # the full protocol: hours on a CPU
    python tools/pareto.py --sweep issue13 --calib-samples 32 --eval-jobs 2 --work /data/final   # issue 13's table
    python tools/pareto.py --max-windows 1 --calib-samples 4 --calib-seqlen 256 --methods rtn,pbllm --out /tmp/p

matplotlib comes from the optional `plot` extra (pip install -e '.[plot]'); without it the plot is skipped.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sagekit.backend import get_backend
from sagekit.eval.perplexity import Tally, log_probs, windows
from sagekit.eval.speed import densify
from sagekit.io.checkpoint import Checkpoint
from sagekit.io.demo import demo_model
from sagekit.io.text import read_text
from sagekit.model.load import load_model
from sagekit.model.tokenizer import load_tokenizer
from sagekit.quant.calibration import CalibOptions
from sagekit.quant import registry
from sagekit.quant.compress import CompressOptions, compress

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2"
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

# (method, knobs label, CompressOptions fields other than method/calib; "calib": True calibrates a method whose
# calibration is optional, "knobs": its knobs as keyword arguments). billm's block 128 and pbllm's 10 % salient
# weights are their papers' settings; sage runs at its default knobs and at --target-bpw 2.5, near the
# baselines' sizes. The sweep is what the full protocol can score on a 2-core CPU in a few hours (each model
# costs about 5 s per window there); the sage targets 1.25-2.0 have their own table in RESULTS.md.
BASELINES: list[tuple[str, str, dict[str, Any]]] = [
    ("rtn", "-", {}),
    ("q1", "block 128", {}),
    ("billm", "block 128", {}),
    ("pbllm", "fraction 0.1", {}),
    ("sage-paper", "default (rate-penalty 0.2)", {}),
    ("sage-paper", "target-bpw 2.5", {"target_bpw": 2.5}),
]
# issue 13's final table: the calibrated recipe at each target of its 16-window table, and GPTQ (groups of 64,
# act-order) at 2, 3 and 4 bits, all calibrated on the same windows
ISSUE13: list[tuple[str, str, dict[str, Any]]] = [
    ("sage-vq", "dim 4 (2 bits), calibrated", {"calib": True}),
    ("sage-vq", "target-bpw 2.55, calibrated", {"calib": True, "target_bpw": 2.55}),
    ("sage-grid", "target-bpw 3.05, calibrated", {"calib": True, "target_bpw": 3.05}),
    ("sage-grid", "target-bpw 4.05, calibrated", {"calib": True, "target_bpw": 4.05}),
    ("gptq", "bits 2, group 64", {"knobs": {"bits": 2}}),
    ("gptq", "bits 3, group 64", {"knobs": {"bits": 3}}),
    ("gptq", "bits 4, group 64", {"knobs": {"bits": 4}}),
]
SWEEPS = {"baselines": BASELINES, "issue13": ISSUE13}


def markers(sweep: str) -> tuple[str, str]:
    """The RESULTS.md markers between which a sweep's table goes (the baselines' are the original ones)."""
    tag = "pareto" if sweep == "baselines" else f"pareto:{sweep}"
    return f"<!-- {tag}:begin (written by tools/pareto.py) -->", f"<!-- {tag}:end -->"


def slug(method: str, label: str) -> str:
    return method + "-" + "".join(c for c in label.split("(")[0] if c.isalnum() or c == ".")


def pareto_front(rows: list[dict[str, Any]]) -> set[int]:
    """Indices of rows no other row beats on both linear true bits and ppl (lower is better for both)."""
    front = set()
    for i, a in enumerate(rows):
        if not any(b["linear_true_bpw"] <= a["linear_true_bpw"] and b["ppl"] <= a["ppl"]
                   and (b["linear_true_bpw"], b["ppl"]) != (a["linear_true_bpw"], a["ppl"]) for b in rows):
            front.add(i)
    return front


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def check_setup(work: Path, setup: dict[str, Any]) -> None:
    """A --work folder belongs to one protocol: resuming it under another would mix two sweeps in one table."""
    path = work / "setup.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = sorted(k for k in setup.keys() | old.keys() if old.get(k) != setup.get(k))
        if changed:
            sys.exit(f"error: {work} holds a sweep with other settings ({', '.join(changed)}): "
                     "pass a new --work folder or delete this one")
    else:
        write_json(path, setup)


def compress_all(src: Path, work: Path, sweep: list[tuple[str, str, dict[str, Any]]], calib: CalibOptions,
                 device: str, workers: int) -> dict[str, dict[str, Any]]:
    """report.json of every configuration, compressing those not finished yet (compress() resumes its own store)."""
    reports = {}
    for method, label, fields in sweep:
        folder = work / slug(method, label)
        if not (folder / "report.json").exists():
            print(f"{method} {label}: compress", file=sys.stderr, flush=True)
            fields, m = dict(fields), registry.get(method)
            needs = fields.pop("calib", False) or m.calibration == "required"
            knobs = m.make_knobs(fields.pop("knobs")) if "knobs" in fields else None
            # FP16 heads on every row: the tables compare the decoder linears (file bits add the same head)
            opts = CompressOptions(method=method, calib=calib if needs else None, device=device,
                                   workers=workers, knobs=knobs, head_bits=16, **fields)
            compress(src, folder, opts)
        reports[slug(method, label)] = json.loads((folder / "report.json").read_text())
    return reports


def done_windows(work: Path) -> dict[int, dict[str, Any]]:
    """Every window scored so far, from all jobs' state files (eval.<job>.json), by window index."""
    done = {}
    for path in sorted(work.glob("eval.*.json")):
        done.update({int(w): entry for w, entry in json.loads(path.read_text())["windows"].items()})
    return done


def score_windows(job: int, src: Path, work: Path, names: list[str], wins: np.ndarray, todo: list[int],
                  device: str) -> None:
    """One job: run the reference and every model on its windows, saving each window's sums as it finishes."""
    backend = get_backend(device)
    path = work / f"eval.{job}.json"
    state = json.loads(path.read_text()) if path.exists() else {"windows": {}}
    ref = load_model(src, backend, wins.shape[1])
    # each compressed model is scored on its dense twin (dequantised once, held in float32): the same weights,
    # and BLAS's GEMMs instead of the runtimes that decode is tuned for (3x faster on a 2048-token window)
    models = {n: densify(load_model(work / n, backend, wins.shape[1], kernels=False), wins.shape[1]) for n in names}
    shape = (wins.shape[1] - 1, ref.config.vocab_size)
    ref_logp, logp = (backend.xp.empty(shape, dtype=backend.xp.float32) for _ in range(2))  # reused by every window
    start = time.perf_counter()
    for i, w in enumerate(todo):
        t0 = time.perf_counter()
        tallies = {n: Tally() for n in ["fp16", *names]}
        log_probs(ref, wins[w], ref_logp)
        tallies["fp16"].add(backend.xp, ref_logp, wins[w], ref_logp)
        for n, model in models.items():
            tallies[n].add(backend.xp, log_probs(model, wins[w], logp), wins[w], ref_logp)
        state["windows"][str(w)] = {"seconds": time.perf_counter() - t0,
                                    "tallies": {n: vars(t) for n, t in tallies.items()}}
        write_json(path, state)
        left = (time.perf_counter() - start) / (i + 1) * (len(todo) - i - 1)
        print(f"job {job}: window {w + 1} ({i + 1}/{len(todo)} of this job): {time.perf_counter() - t0:.0f} s, "
              f"about {left / 60:.0f} min left", file=sys.stderr, flush=True)


def evaluate_all(src: Path, work: Path, names: list[str], ids: np.ndarray, seqlen: int, max_windows: int | None,
                 device: str, jobs: int = 1) -> tuple[dict[str, Tally], int, float]:
    """Sums of every model (and the reference itself) over all windows, added in window order.

    Windows not scored yet are dealt round-robin to `jobs` processes, each with cores // jobs threads: on a CPU
    two single-threaded jobs beat one two-threaded job, since the softmax and scoring are single-threaded.
    Returns the tallies, the window count and the seconds spent per window, summed.
    """
    wins = windows(ids, seqlen, max_windows)
    todo = [w for w in range(len(wins)) if w not in done_windows(work)]
    if todo and jobs == 1:
        score_windows(0, src, work, names, wins, todo, device)
    elif todo:
        run_jobs(jobs, src, work, names, wins, todo, device)
    done = done_windows(work)
    tallies = {n: Tally() for n in ["fp16", *names]}
    for w in range(len(wins)):
        for n, t in done[w]["tallies"].items():
            tallies[n] += Tally(**t)
    return tallies, len(wins), sum(done[w]["seconds"] for w in range(len(wins)))


def run_jobs(jobs: int, src: Path, work: Path, names: list[str], wins: np.ndarray, todo: list[int],
             device: str) -> None:
    """score_windows in `jobs` fresh processes; the thread counts go through the environment they start with."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: threads for k in THREAD_VARS})
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=score_windows, args=(j, src, work, names, wins, todo[j::jobs], device))
             for j in range(jobs)]
    try:
        for proc in procs:
            proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    for proc in procs:
        proc.join()
    failed = [j for j, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        sys.exit(f"error: scoring job(s) {failed} stopped (see above); rerun the same command to resume")


def run_sweep(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    src = Path(args.model) if args.model else demo_model()
    sweep = [s for s in SWEEPS[args.sweep] if args.methods is None or s[0] in args.methods]
    calib = CalibOptions(args.calib, args.calib_samples, args.calib_seqlen, args.calib_seed)
    setup = {"model": str(src), "text": str(args.text), "seqlen": args.seqlen, "max_windows": args.max_windows,
             **calib.to_dict(), "rows": [f"{m} {label}" for m, label, _ in sweep]}
    args.work.mkdir(parents=True, exist_ok=True)
    check_setup(args.work, setup)
    reports = compress_all(src, args.work, sweep, calib, args.device, args.workers)
    tok = load_tokenizer(src if src.is_dir() else src.parent)
    ids = np.asarray(tok.encode(read_text(args.text)).ids, dtype=np.int64)
    names = [slug(m, label) for m, label, _ in sweep]
    tallies, n_windows, seconds = evaluate_all(src, args.work, names, ids, args.seqlen, args.max_windows, args.device,
                                               args.eval_jobs)
    with Checkpoint(src) as ckpt:
        params = sum(int(np.prod(s)) for s in ckpt.config.expected_shapes().values())
        fp16 = tallies["fp16"].result(n_windows, args.seqlen, seconds, True)
        rows = [{"method": "fp16", "knobs": "-", "paper_bits": 16.0, "linear_true_bpw": 16.0,
                 "file_true_bpw": 8.0 * ckpt.file_bytes / params, "file_bytes": ckpt.file_bytes, "ppl": fp16.ppl,
                 "kl": fp16.kl, "top1": fp16.top1, "seconds": 0.0}]
    for (method, label, _), name in zip(sweep, names):
        t, r = reports[name]["totals"], tallies[name].result(n_windows, args.seqlen, seconds, True)
        rows.append({"method": method, "knobs": label,
                     "paper_bits": t["linear_paper_bits"] + t["linear_paper_scale_bits"],
                     "linear_true_bpw": t["linear_true_bpw"], "file_true_bpw": t["file_true_bpw"],
                     "file_bytes": t["file_bytes"], "ppl": r.ppl, "kl": r.kl, "top1": r.top1, "seconds": t["seconds"]})
    setup.update(windows=n_windows, tokens=fp16.tokens, device=get_backend(args.device).describe(),
                 eval_seconds=round(seconds), eval_jobs=args.eval_jobs, date=time.strftime("%Y-%m-%d"))
    return rows, setup


def markdown(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    front = pareto_front(rows)
    lines = [
        f"Model `{Path(setup['model']).name}`; perplexity on `{Path(setup['text']).name}`, {setup['windows']} windows "
        f"of {setup['seqlen']} tokens ({setup['tokens']:,} scored); KL(FP16 || model) per token and top-1 agreement "
        f"in the same pass. Calibrated rows calibrate on `{Path(setup['calib']).name}`: {setup['calib_samples']} windows "
        f"of {setup['calib_seqlen']} tokens, seed {setup['calib_seed']}. {setup['device']}, {setup['date']}; scoring "
        f"took {setup['eval_seconds'] / 3600:.1f} h summed over the windows, {setup['eval_jobs']} window(s) at a time. "
        "Produced by `tools/pareto.py`.",
        "",
        "Paper bits: what each method's paper counts (sage: weight + scaling bits; rtn, q1: sign + scales; billm: "
        "1 + salient-column share; pbllm: 1 + 7 x salient share). True bits: 8 x stored bytes / weights. "
        "**Bold** rows are on the Pareto frontier of perplexity vs linear true bits. Compress s includes the "
        "calibration pass.",
        "",
        "| method | knobs | paper bits | true bits (linear) | true bits (file) | file bytes | ppl | KL | top-1 "
        "| compress s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        b = "**" if i in front else ""
        lines.append(f"| {b}{r['method']}{b} | {r['knobs']} | {r['paper_bits']:.3f} | {b}{r['linear_true_bpw']:.3f}{b} "
                     f"| {r['file_true_bpw']:.3f} | {r['file_bytes']:,} | {b}{r['ppl']:,.2f}{b} | {r['kl']:.4f} "
                     f"| {r['top1']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(path: Path, table: str, sweep: str) -> None:
    """Put the table between the sweep's markers in RESULTS.md, keeping the prose around it (a new file if none)."""
    BEGIN, END = markers(sweep)
    text = path.read_text() if path.exists() else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text += f"\n## Pareto table\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{table}{END}{rest.split(END, 1)[1]}")


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
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight (decoder linear layers, log scale)")
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
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="baselines",
                   help="baselines: the 1-3 bit methods against the paper recipe; issue13: the final recipe and gptq")
    p.add_argument("--methods", default=None, help="comma-separated subset of the sweep's methods (default: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="compress() workers (matrices quantised at once)")
    p.add_argument("--eval-jobs", type=int, default=1,
                   help="processes scoring windows at once, each with cores / jobs threads (2 on a 2-core CPU)")
    p.add_argument("--work", type=Path, default=Path("pareto-work"),
                   help="compressed folders and running sums; rerun with the same folder to resume")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                   help="where RESULTS.md (table between its markers), results.json and pareto.png go")
    args = p.parse_args()
    args.methods = None if args.methods is None else set(args.methods.split(","))
    if args.eval_jobs < 1:
        p.error("--eval-jobs must be at least 1")
    if args.text.resolve() == args.calib.resolve():
        p.error("--calib must not be the evaluation text")
    args.out.mkdir(parents=True, exist_ok=True)
    rows, setup = run_sweep(args)
    suffix = "" if args.sweep == "baselines" else f"-{args.sweep}"
    write_json(args.out / f"results{suffix}.json", {"setup": setup, "rows": rows})
    table = markdown(rows, setup)
    write_results(args.out / "RESULTS.md", table, args.sweep)
    earlier = args.out / "results.json"  # the baselines' sweep, same protocol: drawn beside this one
    if suffix and earlier.exists():
        rows = rows + [r for r in json.loads(earlier.read_text())["rows"] if r["method"] != "fp16"]
    plot(rows, args.out / "pareto.png")
    print(table)


if __name__ == "__main__":
    main()
