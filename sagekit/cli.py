"""The `sagekit` command line: typer commands only; the work lives in the modules they call."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from sagekit.errors import SagekitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="SAGE-PTQ: ~1-bit compression and inference for Llama models, without PyTorch.")
err = Console(stderr=True)
out = Console()

MODEL_HELP = "Model folder (HF layout or a sagekit compressed folder) or a .safetensors file with config.json " \
             "and tokenizer.json beside it. Default: the built-in demo model (SmolLM2-135M-Instruct)."
DEFAULT_GRID_BITS = 4  # the default compress: see README (quality against size on the demo model)
DEVICE_HELP = "auto: CUDA when CuPy sees a GPU, else CPU; cpu: NumPy/Numba; cuda: CuPy (fails without a GPU)."


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Every expected failure becomes one line on stderr and a non-zero exit."""
    try:
        yield
    except SagekitError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def generate(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (no chat template is applied)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature; 0 = greedy (deterministic)."),
    top_p: float = typer.Option(0.95, min=0.0, max=1.0, help="Nucleus sampling: keep the smallest set of tokens "
                                                            "whose probability adds up to this."),
    seed: int = typer.Option(0, help="Random seed for sampling; the same seed gives the same text."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (text, tokens, speeds) instead."),
) -> None:
    """Continue a prompt, streaming tokens as they come, then print prefill and decode speed."""
    from sagekit.model.generate import generate as run
    from sagekit.model.tokenizer import StreamDecoder

    with _user_errors():
        path = _resolve(model)
        tok = _tokenizer(path)
        ids = tok.encode(prompt).ids
        if not ids:
            raise SagekitError("the prompt is empty after tokenisation: give some text with --prompt")
        llm = _model(path, device, len(ids) + max_new_tokens)
        stream = StreamDecoder(tok)
        on_token = None if json_out else (lambda t: (sys.stdout.write(stream.push(t)), sys.stdout.flush()))
        if not json_out:
            sys.stdout.write(prompt)
        g = run(llm, ids, max_new_tokens, temperature, top_p, seed, stop=llm.config.eos_token_ids, on_token=on_token)
        stats = {"prefill_tok_s": g.prefill_tok_s, "decode_tok_s": g.decode_tok_s,
                 "weight_bytes": llm.weight_bytes, "kv_cache_bytes": llm.cache_bytes,
                 "device": llm.backend.describe()}
        if json_out:
            print(json.dumps({"model": str(path), "prompt": prompt, "text": tok.decode(g.tokens), "tokens": g.tokens,
                              "prompt_tokens": len(ids), **stats}))
            return
        sys.stdout.write("\n")
        err.print(f"[dim]{len(ids)} prompt tokens at {g.prefill_tok_s:.1f} tok/s, {len(g.tokens)} new tokens at "
                  f"{g.decode_tok_s:.1f} tok/s on {stats['device']}; weights {_fmt_bytes(llm.weight_bytes)}, "
                  f"KV cache {_fmt_bytes(llm.cache_bytes)}[/]")


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    text: Path = typer.Option(..., "--text", "-t", help="UTF-8 text file to score (e.g. wiki.test.txt)."),
    seqlen: int = typer.Option(2048, min=2, help="Window length in tokens; windows do not overlap."),
    max_windows: Optional[int] = typer.Option(None, min=1, help="Score only the first N windows."),
    reference: Optional[str] = typer.Option(None, help="Reference model: also report KL(reference || model) "
                                                       "per token and top-1 agreement, in the same pass."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Perplexity on a text: tokenise once (no BOS), non-overlapping windows, score every position after the first."""
    from sagekit.eval.perplexity import evaluate, read_text, windows

    with _user_errors():
        path = _resolve(model)
        tok = _tokenizer(path)
        llm = _model(path, device, seqlen)
        ref = _model(_resolve(reference), device, seqlen) if reference else None
        ids = np.asarray(tok.encode(read_text(text)).ids, dtype=np.int64)
        n = len(windows(ids, seqlen, max_windows))
        with progress() as bar:
            task = bar.add_task(f"eval {path.name}", total=n)
            r = evaluate(llm, ids, seqlen, max_windows, reference=ref,
                         on_window=lambda i, _n: bar.update(task, completed=i))
        result = {"model": str(path), "text": str(text), **r.to_dict(), "device": llm.backend.describe()}
        if json_out:
            print(json.dumps(result))
            return
        t = Table(title=f"{path.name} on {text.name}")
        for k in ("ppl", "nll", "kl", "top1", "tokens", "windows", "seqlen", "seconds", "device"):
            if k in result:
                v = result[k]
                t.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        out.print(t)


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Architecture, parameter counts, dtypes and bytes per tensor group (and bits per weight when compressed)."""
    from sagekit.io.checkpoint import Checkpoint
    from sagekit.io.inspect import inspect_checkpoint

    with _user_errors():
        path = _resolve(model)
        with Checkpoint(path) as ckpt:
            info = inspect_checkpoint(ckpt)
        if json_out:
            print(json.dumps(info))
            return
        a = info["architecture"]
        out.print(f"[bold]{path}[/]: Llama, {a['layers']} layers, dim {a['dim']}, MLP {a['hidden_dim']}, "
                  f"{a['heads']} heads / {a['kv_heads']} KV heads (head {a['head_dim']}), vocab {a['vocab']}, "
                  f"rope theta {a['rope_theta']:g}{', tied embeddings' if a['tied_embeddings'] else ''}")
        out.print(f"{info['parameters']:,} parameters; {_fmt_bytes(info['file_bytes'])} on disk "
                  f"(FP16 would be {_fmt_bytes(info['fp16_bytes'])})")
        t = Table("tensor group", "tensors", "dtypes", "bytes")
        for name, g in info["groups"].items():
            t.add_row(name, str(g["tensors"]), ",".join(g["dtypes"]), _fmt_bytes(g["bytes"]))
        out.print(t)
        bits = info["bits"]
        if bits:
            t = Table("matrix", "shape", "G", "salient %", "paper bits", "scale bits", "true bits",
                      title=f"{info['quantization']['method']} matrices (bits per weight from the stored bytes)")
            fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            for m in bits["matrices"]:
                t.add_row(m["name"].removeprefix("model."), "x".join(map(str, m["shape"])), str(m.get("groups", "-")),
                          fmt(m.get("salient_fraction") and 100 * m["salient_fraction"], ".2f"),
                          fmt(m.get("paper_bits"), ".3f"), fmt(m.get("paper_scale_bits"), ".4f"),
                          f"{m['true_bits']:.3f}")
            t.add_row("[bold]decoder linear total[/]", "", "", "", fmt(bits["linear_paper_bits"], ".3f"),
                      fmt(bits["linear_paper_scale_bits"], ".4f"), f"{bits['linear_true_bpw']:.3f}")
            t.add_row("[bold]whole file[/]", "", "", "", "", "", f"{bits['file_true_bpw']:.3f}")
            out.print(t)


@app.command("import-gguf")
def import_gguf_cmd(
    src: Path = typer.Argument(..., help="A Llama GGUF file (any llama.cpp quantisation the gguf package reads)."),
    out_dir: Path = typer.Argument(..., help="Folder to create: FP16 model.safetensors, config.json, tokenizer.json."),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
) -> None:
    """Turn a Llama GGUF into an HF-style FP16 folder (dequantise, un-permute q/k rows, rebuild the tokenizer)."""
    from sagekit.io.gguf_import import import_gguf

    with _user_errors():
        import_gguf(src, out_dir, force=force)
        err.print(f"wrote {out_dir}")


@app.command()
def compress(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP.replace("or a sagekit compressed folder", "")),
    out_dir: Path = typer.Argument(Path("sagekit-out"), help="Folder to create for the packed model."),
    method: str = typer.Option("sage", help="Quantisation method: sage (SAGE-PTQ), or a baseline: rtn, q1, "
                               "billm, pbllm (billm and pbllm need --calib)."),
    recipe: str = typer.Option("grid", help="sage: grid (rotation, one FP16 scale per row, 2^bits Lloyd levels "
                               "per matrix; error feedback with --calib) or paper (the paper's binary + salient "
                               "reconstruction, which the knobs below up to --saliency steer)."),
    bits: int = typer.Option(DEFAULT_GRID_BITS, min=1, max=8, help="sage grid: bits per weight of every matrix "
                             "(with --target-bpw each matrix's bits are solved instead)."),
    salient_bits: int = typer.Option(4, min=2, max=8, help="Bits of each salient weight's correction."),
    max_salient: float = typer.Option(0.05, min=0.0, max=0.5, help="Largest salient fraction p the "
                                      "per-matrix threshold search may choose."),
    target_bpw: Optional[float] = typer.Option(None, min=1.0, help="Land the decoder linear layers' TRUE bits "
                                               "per weight here. grid: each matrix's bits are allocated (fractional "
                                               "targets mix bit widths); paper: one rate penalty is solved, and the "
                                               "rate term chooses the group count (1, 2, 4, 8)."),
    rate_penalty: float = typer.Option(0.2, min=0.0, help="lambda in relative_error + lambda * true_bits, "
                                       "minimised per matrix (ignored with --target-bpw)."),
    group_select: str = typer.Option("silhouette", help="How each matrix's group count G is chosen: silhouette "
                                     "(the paper) or rate (the rate-distortion objective)."),
    n_sub: int = typer.Option(2048, min=16, help="Unsalient |w| values sampled for the kNN graph."),
    knn: int = typer.Option(10, min=1, help="Neighbours per node in the kNN graph."),
    max_groups: int = typer.Option(8, min=1, max=8, help="Largest group count the spectral clustering tries."),
    seed: int = typer.Option(0, help="Seed of every random choice; the same seed gives byte-identical files."),
    saliency: str = typer.Option("magnitude", help="sage: how salient weights are ranked: magnitude (the "
                                 "paper: |w - mean|) or hessian (|w - mean| x the RMS of its input over the "
                                 "calibration windows; needs --calib, beyond the paper)."),
    skip: Optional[str] = typer.Option(None, help="Regex of linear names to keep in FP16, "
                                       "e.g. 'layers\\.0\\.|down_proj'."),
    workers: int = typer.Option(1, min=1, help="Processes quantising matrices in parallel (same output bytes)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text for billm/pbllm and --saliency hessian (e.g. "
                                         "../shared/data/wikitext2/wiki.valid.tokens); never the evaluation text."),
    calib_samples: int = typer.Option(128, min=1, help="Random calibration windows drawn from --calib."),
    calib_seqlen: int = typer.Option(2048, min=2, help="Tokens per calibration window."),
    calib_seed: int = typer.Option(0, help="Seed of the calibration window offsets."),
    pbllm_fraction: float = typer.Option(0.1, min=0.0, max=1.0, help="pbllm: fraction of weights kept as 8-bit "
                                         "integers (the rest are binarised)."),
    damp: float = typer.Option(0.01, min=0.0, help="billm/pbllm: damping added to the Hessian diagonal, as a "
                               "fraction of its mean."),
    device: str = typer.Option("auto", help=DEVICE_HELP + " Used by the calibration passes (billm, pbllm, --saliency hessian)."),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json's totals as one JSON object on stdout."),
) -> None:
    """Compress the decoder linear layers (SAGE-PTQ or a baseline) into a packed folder (report.json inside)."""
    from sagekit.quant.calibration import CalibOptions
    from sagekit.quant.compress import CompressOptions
    from sagekit.quant.compress import compress as run
    from sagekit.quant.sage import SageKnobs

    with _user_errors():
        if group_select not in ("silhouette", "rate"):
            raise SagekitError(f"--group-select must be silhouette or rate, not '{group_select}'")
        src = _resolve(model)
        knobs = SageKnobs(salient_bits=salient_bits, max_salient=max_salient, rate_penalty=rate_penalty,
                          group_select=group_select, n_sub=n_sub, knn=knn, max_groups=max_groups, seed=seed,
                          saliency=saliency)
        if recipe not in ("grid", "paper"):
            raise SagekitError(f"--recipe must be grid or paper, not '{recipe}'")
        if method == "sage" and recipe == "grid":
            method = "sage-grid"
            paper_only = [k for k, v in knobs.to_dict().items() if k != "seed" and v != getattr(SageKnobs(), k)]
            if paper_only:
                raise SagekitError(f"--{paper_only[0].replace('_', '-')} applies to --recipe paper (the grid "
                                   "recipe has --bits and --target-bpw)")
        elif bits != DEFAULT_GRID_BITS:
            raise SagekitError("--bits applies to --method sage --recipe grid")
        baseline_knobs = {"billm": {"damp": damp}, "pbllm": {"fraction": pbllm_fraction, "damp": damp},
                          "sage-grid": {"bits": bits, "seed": seed}}
        calib_opts = CalibOptions(calib, calib_samples, calib_seqlen, calib_seed) if calib else None
        opts = CompressOptions(knobs=knobs, method=method, target_bpw=target_bpw, skip=skip, workers=workers,
                               baseline_knobs=baseline_knobs.get(method, {}), calib=calib_opts, device=device)
        with progress() as bar:
            task = None

            def on_start(phase: str, n: int) -> None:
                nonlocal task
                task = bar.add_task(phase, total=n)

            def on_step(st) -> None:
                bar.advance(task)
                if st is not None and not json_out:
                    bar.console.print(
                        f"{st.name:34s} {st.shape[0]:>6d}x{st.shape[1]:<6d} salient {100 * st.salient_fraction:5.2f}% "
                        f"G={st.groups} paper {st.paper_bits:.3f} true {st.true_bits:.3f} bpw "
                        f"err {st.rel_error:.4f} {st.seconds:5.2f}s", highlight=False)

            def on_note(line: str) -> None:
                bar.console.print(f"[yellow]{line}[/]", highlight=False)

            report = run(src, out_dir, opts, force=force, on_start=on_start, on_step=on_step, on_note=on_note)
        if json_out:
            print(json.dumps({"out_dir": str(out_dir), **report["totals"]}))
            return
        out.print(_summary_table(report, out_dir))


def _summary_table(report: dict, out_dir: Path) -> Table:
    t = report["totals"]
    table = Table(title=f"{out_dir}: {report['method']}", show_header=True)
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [
        ("decoder linear weights", f"{t['linear_weights']:,}"),
        ("paper-style weight bits", f"{t['linear_paper_bits']:.4f}"),
        ("paper-style scaling bits", f"{t['linear_paper_scale_bits']:.4f}"),
        ("true bits / weight (linear)", f"{t['linear_true_bpw']:.4f}"),
        ("true bits / weight (whole file)", f"{t['file_true_bpw']:.4f}"),
        ("relative error (weighted mean)", f"{t['linear_rel_error']:.4f}"),
        ("file bytes", f"{t['file_bytes']:,} ({_fmt_bytes(t['file_bytes'])})"),
        ("FP16 bytes", f"{t['fp16_bytes']:,} ({_fmt_bytes(t['fp16_bytes'])})"),
        ("seconds", f"{t['seconds']:.1f}"),
    ]
    if report["rate_penalty_used"] is not None:  # sage only
        rows.insert(-1, ("rate penalty used", f"{report['rate_penalty_used']:.4g}"))
    for k, v in rows:
        table.add_row(k, v)
    return table


@app.command()
def demo(
    out_dir: Optional[Path] = typer.Argument(None, help="Where the compressed demo model goes "
                                             "(default: the sagekit cache, reused when present)."),
    prompt: str = typer.Option("The capital of France is", help="Prompt sent to both models."),
    max_new_tokens: int = typer.Option(24, min=1, help="Tokens each model generates (greedy)."),
    text: Optional[Path] = typer.Option(None, help="Text for the perplexity comparison (default: a short "
                                        "passage that ships with sagekit)."),
    seqlen: int = typer.Option(256, min=16, help="Perplexity window length."),
    max_windows: int = typer.Option(4, min=1, help="Perplexity windows scored."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    force: bool = typer.Option(False, help="Compress again even if OUT_DIR exists."),
) -> None:
    """The whole job on the built-in model: import, compress, then FP16 and compressed side by side."""
    from importlib.resources import files

    from sagekit.eval.perplexity import evaluate, read_text
    from sagekit.io.demo import cache_dir, demo_model
    from sagekit.model.generate import generate as run_generate
    from sagekit.quant.compress import CompressOptions
    from sagekit.quant.compress import compress as run_compress

    with _user_errors():
        fp16 = demo_model(log=lambda m: err.print(f"[dim]{m}[/]"))
        packed = out_dir or cache_dir() / "smollm2-135m-instruct-sage"
        if force or not (packed / "report.json").is_file():
            with progress() as bar:
                task = bar.add_task("compress", total=None)
                run_compress(fp16, packed, CompressOptions(), force=force,
                             on_start=lambda phase, n: bar.update(task, total=n, description=phase),
                             on_step=lambda st: bar.advance(task))
        else:
            err.print(f"[dim]reusing {packed} (pass --force to compress again)[/]")
        report = json.loads((packed / "report.json").read_text())
        out.print(_summary_table(report, packed))

        tok = _tokenizer(fp16)
        ids = tok.encode(prompt).ids
        passage = text or Path(str(files("sagekit") / "data" / "demo_passage.txt"))
        text_ids = np.asarray(tok.encode(read_text(passage)).ids, dtype=np.int64)
        table = Table("", "FP16 reference", "SAGE compressed", title=f"prompt: {prompt!r}")
        rows: dict[str, list[str]] = {k: [] for k in ("continuation", "decode tok/s", "weights in memory",
                                                      "file bytes", f"ppl ({passage.name})")}
        for path in (fp16, packed):
            llm = _model(path, device, max(len(ids) + max_new_tokens, seqlen))
            g = run_generate(llm, ids, max_new_tokens, temperature=0.0)
            r = evaluate(llm, text_ids, seqlen, max_windows)
            files_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
            rows["continuation"].append(repr(tok.decode(g.tokens)))
            rows["decode tok/s"].append(f"{g.decode_tok_s:.1f}")
            rows["weights in memory"].append(_fmt_bytes(llm.weight_bytes))
            rows["file bytes"].append(_fmt_bytes(files_bytes))
            rows[f"ppl ({passage.name})"].append(f"{r.ppl:.2f} ({r.windows}x{seqlen} tokens)")
        for k, v in rows.items():
            table.add_row(k, *v)
        out.print(table)


@app.command()
def bench(
    model: Optional[str] = typer.Argument(None, help="A compressed sagekit folder (its dense twin is its "
                                          "dequantised weights). Omit and use --shape for random weights."),
    shape: Optional[str] = typer.Option(None, help="Random packed weights of a real shape: llama2-7b, llama3-8b, "
                                        "llama2-70b-layer, small, tiny (no compression needed)."),
    layers: Optional[int] = typer.Option(None, min=1, help="With --shape: build only this many layers "
                                         "(a dense 7B twin needs 26 GB in float32 on the CPU)."),
    groups: int = typer.Option(1, min=1, max=8, help="With --shape: group count G of the random weights."),
    salient: float = typer.Option(0.01, min=0.0, max=0.5, help="With --shape: salient fraction."),
    decode_tokens: int = typer.Option(128, min=1, help="Decode steps timed, from an empty cache (llama-bench's "
                                      "tg128) and again after the prompt (decode at depth)."),
    prefill_tokens: int = typer.Option(512, min=1, help="Prompt length of the timed prefill; also the depth of "
                                       "the second decode timing."),
    repeats: int = typer.Option(20, min=1, help="Repeats per matrix timing (median reported)."),
    rounds: int = typer.Option(3, min=1, help="Decode/prefill timings alternate packed and dense this many "
                               "times; medians are reported (--json also lists every round)."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Packed kernels vs a dense baseline in the same run: per-matrix GEMV and decode / prefill tokens/s."""
    from sagekit.backend import get_backend
    from sagekit.eval.speed import BENCH_SHAPES, load_pair, matrix_speed, pair_speed, peak_bandwidth, random_pair

    with _user_errors():
        be = get_backend(device)
        n = prefill_tokens + decode_tokens + 8
        if (model is None) == (shape is None):
            raise SagekitError("give either a compressed MODEL folder or --shape NAME")
        if shape is not None and shape not in BENCH_SHAPES:
            raise SagekitError(f"unknown --shape '{shape}': choose from {', '.join(sorted(BENCH_SHAPES))}")
        pair = load_pair(Path(model), be, n) if model else random_pair(shape, be, n, layers, groups, salient)
        matrices = matrix_speed(pair, repeats)
        speeds = pair_speed(pair, decode_tokens, prefill_tokens, rounds)
        decode, prefill = speeds["decode_tok_s"], speeds["prefill_tok_s"]
        dense_decode, dense_prefill = speeds["dense_decode_tok_s"], speeds["dense_prefill_tok_s"]
        peak, peak_source = peak_bandwidth(be)
        result = {"device": be.describe(), "model": model or shape, "peak_gbps": peak, "peak_source": peak_source,
                  "matrices": matrices, **speeds}
        if json_out:
            print(json.dumps(result))
            return
        t = Table("matrix", "shape", "packed ms", "dense ms", "speedup", "GB/s", "% peak",
                  title=f"{result['model']} on {result['device']} (peak {peak:.0f} GB/s, {peak_source})")
        for m in matrices:
            t.add_row(m["name"], "x".join(map(str, m["shape"])), f"{m['ms']:.3f}", f"{m['dense_ms']:.3f}",
                      f"{m['speedup']:.2f}x", f"{m['gbps']:.1f}", f"{100 * m['peak_fraction']:.1f}")
        out.print(t)
        depth, dense_depth = speeds["decode_depth_tok_s"], speeds["dense_decode_depth_tok_s"]
        out.print(f"decode  {decode:8.1f} tok/s packed  {dense_decode:8.1f} tok/s dense  "
                  f"({decode / dense_decode:.2f}x, {decode_tokens} tokens from an empty cache)")
        out.print(f"decode  {depth:8.1f} tok/s packed  {dense_depth:8.1f} tok/s dense  "
                  f"({depth / dense_depth:.2f}x, {decode_tokens} tokens after the {prefill_tokens}-token prompt)")
        out.print(f"prefill {prefill:8.1f} tok/s packed  {dense_prefill:8.1f} tok/s dense  "
                  f"({prefill / dense_prefill:.2f}x, {prefill_tokens} tokens)")
