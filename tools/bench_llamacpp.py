"""llama.cpp's llama-bench against `sagekit bench`, on the same machine, in alternating rounds.

Why: llama.cpp is the yardstick a user of small quantized models knows (issue 14). This builds llama-bench
and llama-quantize in a temporary folder from the llama.cpp source inside the llama-cpp-python sdist
(nothing of it is kept or committed, and sagekit does not depend on it), makes a Q4_0 GGUF of the demo model
from its shipped Q4_1 (`llama-quantize --allow-requantize`), then alternates, round by round:
  * llama-bench on Q4_1 and Q4_0: pp512, tg128, and tg128 at depth 512 (`-d 512`), flash attention off and on;
  * `sagekit bench FOLDER --json --device cpu` on each compressed folder given (its decode from an empty
    cache, decode after a 512-token prompt, and the 512-token prefill);
  * the peak resident memory (`rss128`, MiB) of a 128-token generation: `llama-bench -p 0 -n 128` and
    `sagekit generate FOLDER -n 128` from a 5-token prompt, read from the kernel's accounting of that child.
Both get 2 threads. Medians over rounds; the load average is recorded before and after every run, because
timings on a busy machine mean nothing (llama.cpp's threads collapse under contention).

    python tools/bench_llamacpp.py --keep-build DIR --build-only        # any time: about 10 min of 2 cores
    python tools/bench_llamacpp.py FOLDER [FOLDER ...] [--rounds 5] [--keep-build DIR] [--json out.json]

On the 2-core development VM a native build of the sdist's llama.cpp dies in its AMX code (illegal
instruction at `tileloadd`), so the C and C++ flags get -mno-amx-tile -mno-amx-int8 -mno-amx-bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
THREADS = 2


def run(cmd: list[str], **kw) -> str:
    """stdout of a command that must succeed (its stderr is shown when it does not)."""
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode:
        sys.exit(f"error: {' '.join(cmd[:3])} ... exited {r.returncode}:\n{r.stderr[-3000:]}")
    return r.stdout


def build(work: Path) -> tuple[Path, str]:
    """(bin folder with llama-bench and llama-quantize, the llama-cpp-python version they came from); a kept
    build that has both is reused."""
    done = next(work.glob("llama_cpp_python-*.tar.gz"), None)
    if done is not None and all((work / "build" / "bin" / b).is_file() for b in ("llama-bench", "llama-quantize")):
        return work / "build" / "bin", done.name[len("llama_cpp_python-"):-len(".tar.gz")]
    run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps", "-q", "-d", str(work),
         "llama-cpp-python"])
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    version = sdist.name[len("llama_cpp_python-"):-len(".tar.gz")]
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
    out = work / "build"
    flags = f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"
    run(["cmake", "-S", str(src), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
         "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *flags])
    run(["cmake", "--build", str(out), "--target", "llama-bench", "llama-quantize", "-j", str(THREADS)])
    return out / "bin", version


def loadavg() -> float:
    return os.getloadavg()[0]


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident memory of one run of cmd, in MiB (ru_maxrss of that child alone, as /usr/bin/time -v)."""
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"error: {' '.join(cmd[:4])} ... exited {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024


def llama_bench(binary: Path, gguf: Path, fa: int) -> dict[str, float]:
    """tokens/s of pp512, tg128 and tg128 at depth 512 (one repetition each: the rounds repeat), and the peak
    memory of a tg128 run."""
    rows = json.loads(run([str(binary), "-m", str(gguf), "-t", str(THREADS), "-p", "512", "-n", "128",
                           "-d", "0,512", "-r", "1", "-fa", str(fa), "-o", "json"]))
    speeds = {}
    for r in rows:
        kind = "pp512" if r["n_prompt"] else "tg128"
        depth = r.get("n_depth", 0)
        speeds[kind if depth == 0 else f"{kind}@d{depth}"] = float(r["avg_ts"])
    speeds["rss128"] = peak_rss_mib([str(binary), "-m", str(gguf), "-t", str(THREADS), "-p", "0", "-n", "128",
                                     "-r", "1", "-fa", str(fa)])
    return speeds


def sagekit_bench(folder: Path) -> dict[str, float]:
    """sagekit's decode (empty cache and at depth 512) and 512-token prefill of a compressed folder."""
    r = json.loads(run([sys.executable, "-m", "sagekit", "bench", str(folder), "--json", "--device", "cpu",
                        "--rounds", "1", "--repeats", "3"]))
    rss = peak_rss_mib([sys.executable, "-m", "sagekit", "generate", str(folder), "--prompt", "The capital of France is",
                        "-n", "128", "--temperature", "0", "--device", "cpu"])
    return {"tg128": r["decode_tok_s"], "tg128@d512": r["decode_depth_tok_s"], "pp512": r["prefill_tok_s"],
            "dense tg128": r["dense_decode_tok_s"], "rss128": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="*", type=Path, help="compressed sagekit folders")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--keep-build", type=Path, help="build here and keep it (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="write every round here")
    ap.add_argument("--build-only", action="store_true", help="build into --keep-build and stop (the build "
                                                             "needs no quiet machine; the rounds do)")
    args = ap.parse_args()
    if args.build_only and not args.keep_build:
        sys.exit("error: --build-only needs --keep-build DIR")
    os.environ.update(OMP_NUM_THREADS=str(THREADS), NUMBA_NUM_THREADS=str(THREADS))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep_build or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        binaries, version = build(work)
        if args.build_only:
            print(f"built llama-cpp-python {version}'s llama-bench and llama-quantize in {binaries}")
            return
        from sagekit.io.demo import demo_gguf  # the shipped Q4_1 of the demo model

        q41 = demo_gguf()
        q40 = work / "demo-q4_0.gguf"
        run([str(binaries / "llama-quantize"), "--allow-requantize", str(q41), str(q40), "Q4_0"])
        runs = {f"llama.cpp {label} fa={fa}": (lambda q=q, fa=fa: llama_bench(binaries / "llama-bench", q, fa))
                for label, q in (("Q4_1", q41), ("Q4_0", q40)) for fa in (0, 1)}
        runs.update({f"sagekit {f.name}": (lambda f=f: sagekit_bench(f)) for f in args.folders})
        rounds: list[dict] = []
        for i in range(args.rounds):
            for name, fn in runs.items():
                before = loadavg()
                t0 = time.time()
                speeds = fn()
                rounds.append({"round": i, "run": name, "load_before": before, "load_after": loadavg(),
                               "start": time.strftime("%H:%M:%S", time.gmtime(t0)), **speeds})
                print(json.dumps(rounds[-1]), file=sys.stderr, flush=True)
    keys = ["tg128", "tg128@d512", "pp512", "rss128"]
    print(f"llama-cpp-python {version} (llama.cpp source inside its sdist), {THREADS} threads, "
          f"{args.rounds} alternating rounds, medians; load average {min(r['load_before'] for r in rounds):.2f}"
          f" to {max(r['load_after'] for r in rounds):.2f}\n")
    print("| run | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name in runs:
        mine = [r for r in rounds if r["run"] == name]
        print(f"| {name} | " + " | ".join(f"{statistics.median(r[k] for r in mine):.1f}" for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps({"version": version, "rounds": rounds}, indent=1) + "\n")


if __name__ == "__main__":
    main()
