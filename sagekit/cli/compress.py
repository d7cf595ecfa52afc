"""`compress` and `demo`: make a packed folder, and show one next to its FP16 original."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import typer
from rich.table import Table

from sagekit.cli.common import (
    DEVICE_HELP,
    MODEL_HELP,
    _fmt_bytes,
    _model,
    _resolve,
    _tokenizer,
    _user_errors,
    app,
    err,
    out,
    progress,
)
from sagekit.cli.knobs import CALIB, GRID, UNSET, with_knob_options
from sagekit.errors import SagekitError


@app.command()
@with_knob_options
def compress(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP.replace("or a sagekit compressed folder", "")),
    out_dir: Path = typer.Argument(Path("sagekit-out"), help="Folder to create for the packed model."),
    method: str = typer.Option("sage", help="Quantisation method: sage (SAGE-PTQ), or a baseline: rtn, q1, "
                               "billm, pbllm, gptq (billm, pbllm and gptq need --calib; gptq takes --bits)."),
    recipe: Optional[str] = typer.Option(None, help="sage: grid [default] (rotation, one FP16 scale per row, "
                                         "2^bits Lloyd levels per matrix; error feedback with --calib), vq (the "
                                         "same with a 256-entry codebook per matrix for runs of --dim weights) or "
                                         "paper (the paper's binary + salient reconstruction, which the knobs of "
                                         "its panel steer).", rich_help_panel=GRID, **UNSET),
    target_bpw: Optional[float] = typer.Option(None, min=1.0, help="Land the decoder linear layers' TRUE bits "
                                               "per weight here. grid: each matrix's bits are allocated (fractional "
                                               "targets mix bit widths); vq: each matrix's --dim; paper: one rate "
                                               "penalty is solved, and the rate term chooses the group count (1, 2, "
                                               "4, 8)."),
    head_bits: Optional[int] = typer.Option(None, help="Bits of the token embedding and lm_head (tied on the "
                                            "demo model: 21% of its weights), packed with the grid recipe: 2 to 8, "
                                            "or 16 to keep them FP16. With --calib the lm_head is rounded under its "
                                            "inputs' Hessian. Default: 5 for sage with --calib (+0.56% ppl on the "
                                            "demo model), else 16 (data-free 5 bits cost 1.9%; baselines keep "
                                            "FP16)."),
    skip: Optional[str] = typer.Option(None, help="Regex of linear names to keep in FP16, "
                                       "e.g. 'layers\\.0\\.|down_proj'."),
    workers: int = typer.Option(1, min=1, help="Processes quantising matrices in parallel (same output bytes)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text for the methods that use one (e.g. "
                                         "../shared/data/wikitext2/wiki.valid.tokens); never the evaluation text.",
                                         rich_help_panel=CALIB),
    calib_samples: int = typer.Option(128, min=1, help="Random calibration windows drawn from --calib.",
                                      rich_help_panel=CALIB),
    calib_seqlen: int = typer.Option(2048, min=2, help="Tokens per calibration window.", rich_help_panel=CALIB),
    calib_seed: int = typer.Option(0, help="Seed of the calibration window offsets.", rich_help_panel=CALIB),
    fp_targets: bool = typer.Option(False, help="Fit each quantised layer to the FP16 model's outputs, not to "
                                    "what the quantised layers before it produce (GPTAQ's asymmetric "
                                    "calibration; a second forward pass per layer). Experimental: on the demo "
                                    "model at 2 bits it made perplexity 7x worse (docs/RESULTS.md).",
                                    rich_help_panel=CALIB),
    device: str = typer.Option("auto", help=DEVICE_HELP + " Used by the calibration passes."),
    force: bool = typer.Option(False, help="Replace OUT_DIR if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print report.json's totals as one JSON object on stdout."),
    **knobs: Any,
) -> None:
    """Compress the decoder linear layers (SAGE-PTQ or a baseline) into a packed folder (report.json inside)."""
    from sagekit.quant import registry
    from sagekit.quant.calibration import CalibOptions
    from sagekit.quant.compress import CompressOptions

    with _user_errors():
        src = _resolve(model)
        name = registry.resolve(method, recipe)
        knobs = registry.get(name).make_knobs({k: v for k, v in knobs.items() if v is not None})
        if fp_targets and not calib:
            raise SagekitError("--fp-targets changes how calibration fits each layer: pass --calib FILE too")
        calib_opts = CalibOptions(calib, calib_samples, calib_seqlen, calib_seed, fp_targets) if calib else None
        opts = CompressOptions(method=name, knobs=knobs, target_bpw=target_bpw, skip=skip, workers=workers,
                               calib=calib_opts, device=device, head_bits=head_bits)
        report = _run_with_progress(src, out_dir, opts, force, quiet=json_out)
        if json_out:
            print(json.dumps({"out_dir": str(out_dir), **report["totals"]}))
            return
        out.print(_summary_table(report, out_dir))


def _run_with_progress(src: Path, out_dir: Path, opts: Any, force: bool, quiet: bool) -> dict:
    """quant.compress.compress under a progress bar, one line per matrix unless quiet; the report."""
    from sagekit.quant.compress import compress as run

    with progress() as bar:
        task = None

        def on_start(phase: str, n: int) -> None:
            nonlocal task
            task = bar.add_task(phase, total=n)

        def on_step(st) -> None:
            bar.advance(task)
            if st is not None and not quiet:
                bar.console.print(
                    f"{st.name:34s} {st.shape[0]:>6d}x{st.shape[1]:<6d} salient {100 * st.salient_fraction:5.2f}% "
                    f"G={st.groups} paper {st.paper_bits:.3f} true {st.true_bits:.3f} bpw "
                    f"err {st.rel_error:.4f} {st.seconds:5.2f}s", highlight=False)

        def on_note(line: str) -> None:
            bar.console.print(f"[yellow]{line}[/]", highlight=False)

        return run(src, out_dir, opts, force=force, on_start=on_start, on_step=on_step, on_note=on_note)


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

    from sagekit.eval.perplexity import evaluate
    from sagekit.io.demo import demo_model
    from sagekit.io.text import read_text
    from sagekit.model.generate import generate as run_generate

    with _user_errors():
        fp16 = demo_model(log=lambda m: err.print(f"[dim]{m}[/]"))
        packed = _demo_packed(fp16, out_dir, force)
        report = json.loads((packed / "report.json").read_text())
        out.print(_summary_table(report, packed))

        tok = _tokenizer(fp16)
        ids = tok.encode(prompt).ids
        passage = text or Path(str(files("sagekit") / "data" / "demo_passage.txt"))
        text_ids = np.asarray(tok.encode(read_text(passage)).ids, dtype=np.int64)
        table = Table("", "FP16 reference", "SAGE compressed", title=f"prompt: {prompt!r}")
        rows: dict[str, list[str]] = {k: [] for k in ("continuation", "decode tok/s", "weights in memory",
                                                      "file bytes", f"ppl ({passage.name})")}
        # the slow part after the summary: two models, and on a fresh install Numba compiling their kernels
        err.print(f"[dim]running both models: load, {max_new_tokens} greedy tokens, perplexity of {max_windows} "
                  f"x {seqlen} tokens (the first run also compiles the kernels)[/]", highlight=False)
        with progress() as bar:
            task = bar.add_task("", total=6)
            for label, path in (("FP16 reference", fp16), ("SAGE compressed", packed)):
                bar.update(task, description=f"{label}: load")
                llm = _model(path, device, max(len(ids) + max_new_tokens, seqlen))
                # one decode step first, so that decode tok/s is the steady rate, not Numba's first compilation
                # (the compressed model's fused decode step compiles for about 25 s on a fresh install)
                llm.forward(np.asarray(ids[:1]), 0, last_only=True)
                bar.update(task, advance=1, description=f"{label}: generate")
                g = run_generate(llm, ids, max_new_tokens, temperature=0.0)
                bar.update(task, advance=1, description=f"{label}: perplexity")
                r = evaluate(llm, text_ids, seqlen, max_windows)
                bar.advance(task)
                files_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
                rows["continuation"].append(repr(tok.decode(g.tokens)))
                rows["decode tok/s"].append(f"{g.decode_tok_s:.1f}")
                rows["weights in memory"].append(_fmt_bytes(llm.weight_bytes))
                rows["file bytes"].append(_fmt_bytes(files_bytes))
                rows[f"ppl ({passage.name})"].append(f"{r.ppl:.2f} ({r.windows}x{seqlen} tokens)")
            bar.update(task, description="both models run")
        for k, v in rows.items():
            table.add_row(k, *v)
        out.print(table)


def _demo_packed(fp16: Path, out_dir: Optional[Path], force: bool) -> Path:
    """The compressed demo folder: `sagekit compress` of the demo model, or the one already there."""
    from sagekit.io.demo import cache_dir
    from sagekit.quant.compress import CompressOptions
    from sagekit.quant.compress import compress as run_compress
    from sagekit.quant.sage_grid import DEFAULT_BITS

    packed = out_dir or cache_dir() / f"smollm2-135m-instruct-sage-grid{DEFAULT_BITS}"
    if not force and (packed / "report.json").is_file():
        err.print(f"[dim]reusing {packed} (pass --force to compress again)[/]")
        return packed
    with progress() as bar:
        task = bar.add_task("compress", total=None)
        run_compress(fp16, packed, CompressOptions(method="sage-grid"), force=force,  # = `sagekit compress`
                     on_start=lambda phase, n: bar.update(task, total=n, description=phase),
                     on_step=lambda st: bar.advance(task))
    return packed
