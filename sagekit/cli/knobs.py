"""The method knobs of `compress` as typer options, in one table, and the decorator that adds them.

Each knob option defaults to None ("not given"): the method's knobs dataclass (sagekit.quant.registry) holds
the defaults, and an option given to a method that has no such knob is a one-line error there. Options are
grouped in --help by the recipe or method they steer.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import typer

GRID, PAPER, CALIB, BASE = ("sage grid recipe (default)", "sage paper recipe (--recipe paper)", "calibration",
                             "baselines (--method rtn, q1, billm, pbllm, gptq)")  # --help panels
UNSET = dict(show_default=False)

KNOB_OPTIONS: dict[str, tuple[Any, Any]] = {  # option name -> (type, typer option)
    "dim": (Optional[int], typer.Option(None, help="sage vq: weights per one-byte codeword, 2, 3, 4, 6 or 8 "
        "[4 = 2 bits per weight].", rich_help_panel=GRID, **UNSET)),
    "bits": (Optional[int], typer.Option(None, min=1, max=8, help="Bits per weight of every matrix: sage grid "
        "[5; with --target-bpw they are solved per matrix instead] and gptq [4].",
        rich_help_panel=GRID, **UNSET)),
    "rotate": (Optional[bool], typer.Option(None, "--rotate/--no-rotate", help="sage grid: rotate each weight's input "
        "side (seeded Kronecker rotation) before quantising [on]; --no-rotate is "
        "an ablation.", rich_help_panel=GRID, **UNSET)),
    "row_scale": (Optional[bool], typer.Option(None, "--row-scale/--no-row-scale", help="sage grid: one FP16 scale "
        "per row [on]; --no-row-scale keeps one scale for the whole matrix (an "
        "ablation).", rich_help_panel=GRID, **UNSET)),
    "levels": (Optional[str], typer.Option(None, help="sage grid: lloyd [default] (levels fitted to each matrix), "
        "symmetric (a sign times fitted magnitudes: runs on the packed LUT kernel on the CPU) or uniform.", rich_help_panel=GRID, **UNSET)),
    "error_feedback": (Optional[bool], typer.Option(None, "--error-feedback/--no-error-feedback", help="sage grid "
        "and vq with --calib: round codes by LDLQ, pushing each column's error "
        "onto the columns not yet rounded [on].", rich_help_panel=GRID,
        **UNSET)),
    "act_order": (Optional[bool], typer.Option(None, "--act-order/--no-act-order", help="sage grid and vq "
        "with --calib: LDLQ rounds the columns (vq: whole runs) in descending "
        "order of the Hessian's diagonal (GPTQ's act-order) [on].", rich_help_panel=GRID, **UNSET)),
    "salient_bits": (Optional[int], typer.Option(None, min=2, max=8, help="Bits of each salient weight's correction "
        "[4].", rich_help_panel=PAPER, **UNSET)),
    "max_salient": (Optional[float], typer.Option(None, min=0.0, max=0.5, help="Largest salient fraction p the "
        "per-matrix threshold search may choose [0.05].", rich_help_panel=PAPER,
        **UNSET)),
    "rate_penalty": (Optional[float], typer.Option(None, min=0.0, help="lambda in relative_error + lambda * "
        "true_bits, minimised per matrix [0.2] (ignored with --target-bpw).",
        rich_help_panel=PAPER, **UNSET)),
    "group_select": (Optional[str], typer.Option(None, help="How each matrix's group count G is chosen: silhouette "
        "[default] (the paper) or rate (the rate-distortion objective).",
        rich_help_panel=PAPER, **UNSET)),
    "n_sub": (Optional[int], typer.Option(None, min=16, help="Unsalient |w| values sampled for the kNN graph [2048].",
        rich_help_panel=PAPER, **UNSET)),
    "knn": (Optional[int], typer.Option(None, min=1, help="Neighbours per node in the kNN graph [10].",
        rich_help_panel=PAPER, **UNSET)),
    "max_groups": (Optional[int], typer.Option(None, min=1, max=8, help="Largest group count the spectral "
        "clustering tries [8].", rich_help_panel=PAPER, **UNSET)),
    "seed": (Optional[int], typer.Option(None, help="sage: seed of every random choice [0]; the same seed gives "
        "byte-identical files.", **UNSET)),
    "saliency": (Optional[str], typer.Option(None, help="sage paper: how salient weights are ranked: magnitude "
        "[default] (the paper: |w - mean|) or hessian (|w - mean| x the RMS of "
        "its input over the calibration windows; needs --calib, beyond the "
        "paper).", rich_help_panel=PAPER, **UNSET)),
    "pbllm_fraction": (Optional[float], typer.Option(None, min=0.0, max=1.0, help="pbllm: fraction of weights kept "
        "as 8-bit integers (the rest are binarised) [0.1].",
        rich_help_panel=BASE, **UNSET)),
    "damp": (Optional[float], typer.Option(None, min=0.0, help="billm/pbllm/gptq: damping added to the Hessian "
        "diagonal, as a fraction of its mean [0.01].", rich_help_panel=BASE, **UNSET)),
}


def with_knob_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command taking **knobs one keyword option per KNOB_OPTIONS row (typer reads the signature)."""
    sig = inspect.signature(command)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
             for n, (kind, opt) in KNOB_OPTIONS.items()]
    command.__signature__ = sig.replace(parameters=fixed + extra)
    command.__annotations__.update({n: kind for n, (kind, _) in KNOB_OPTIONS.items()})
    return command
