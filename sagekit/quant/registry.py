"""The quantisation methods `sagekit compress` knows: the one place that lists them.

A method is a module (MODULES gives its import path) that declares METHOD (a Method below) and
quantize(w, h, name, **knobs) -> (layout object of sagekit.format, MatrixStats). Modules are imported on
first use, so that listing the methods (for --help) costs nothing. Adding a method is its module plus one
line of MODULES; a new stored layout is a file in sagekit.format plus one line of sagekit.format.layouts.
Quantising needs SciPy, which the runtime install leaves to the `compress` extra: get() is where every
compression (CLI, API, demo) first reaches a method, so it refuses there, in one line, before any work.

Names are `family-recipe` where a family has several recipes (`sage-grid`, `sage-paper`): the CLI's
`--method sage --recipe paper` picks `sage-paper`, and a family's first line is its default recipe.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from sagekit.errors import SagekitError

MODULES = {
    "sage-grid": "sagekit.quant.sage_grid",
    "sage-paper": "sagekit.quant.sage",
    "sage-vq": "sagekit.quant.sage_vq",
    "rtn": "sagekit.quant.rtn",
    "q1": "sagekit.quant.q1",
    "billm": "sagekit.quant.billm",
    "pbllm": "sagekit.quant.pbllm",
    "gptq": "sagekit.quant.gptq",
}
OLD_NAMES = {"sage": "sage-paper"}  # what folders written before the registry record
SCIPY_MISSING = "compressing needs SciPy, which this install lacks: pip install 'sagekit[compress]'"

# plan(job) -> state: the per-matrix knobs that land a --target-bpw (see Method.plan)
Plan = Callable[["PlanJob"], dict[str, Any]]


@dataclass(frozen=True)
class Method:
    """What compress and the CLI need to know of a method besides its quantize().

    knobs: a frozen dataclass; its fields are the method's compress options (field metadata "option"
    names the CLI option when it differs) and its defaults theirs. calibration: "none", "optional" (used
    when --calib is given) or "required"; a knobs class may refine it with a `calibration` property.
    plan: how --target-bpw is met (None: the method has no rate to steer).
    """

    name: str
    layout: str
    knobs: type
    calibration: str = "none"
    plan: Plan | None = None

    def calibration_of(self, knobs: Any) -> str:
        return getattr(knobs, "calibration", self.calibration)

    def make_knobs(self, given: dict[str, Any]) -> Any:
        """The knobs from the options the user gave (by option name); others keep their defaults."""
        options = option_names(self.knobs)
        unknown = [k for k in given if k not in options]
        if unknown:
            owners = [n for n in MODULES if unknown[0] in option_names(get(n).knobs)]
            where = "--method " + ", ".join(cli_label(n) for n in owners) if owners else "no method"
            raise SagekitError(f"--{unknown[0].replace('_', '-')} applies to {where}, not to --method "
                               f"{cli_label(self.name)}")
        try:
            return self.knobs(**{options[k]: v for k, v in given.items()})
        except ValueError as e:
            raise SagekitError(str(e)) from None

    def module(self) -> Any:
        return importlib.import_module(MODULES[self.name])


@dataclass
class PlanJob:
    """What a plan sees: the matrices (name -> (out, in)), the target, the knobs, and a way to run a
    function of each matrix's weight in the compress worker pool: map_weights(fn, [(name, arg), ...])
    yields fn(weight, name, arg) in order (fn must be a module-level function, it may run in another process)."""

    sizes: dict[str, tuple[int, int]]
    target_bpw: float
    knobs: Any
    map_weights: Callable[[Callable, list[tuple[str, Any]]], Any]
    on_start: Callable[[str, int], None] | None = None
    on_step: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class NoKnobs:
    """The knobs of a method without options."""


def option_names(knobs: type) -> dict[str, str]:
    """CLI option name (with underscores) -> knobs field name."""
    return {f.metadata.get("option", f.name): f.name for f in dataclasses.fields(knobs)}


def get(name: str) -> Method:
    name = OLD_NAMES.get(name, name)
    if name not in MODULES:
        raise SagekitError(f"unknown method '{name}': use {', '.join(cli_labels())}")
    try:
        import scipy  # noqa: F401  (here, not where a method first uses it: that can be minutes into a run)
    except ImportError:
        raise SagekitError(SCIPY_MISSING) from None
    return importlib.import_module(MODULES[name]).METHOD


def resolve(method: str, recipe: str | None) -> str:
    """The registered name for the CLI's --method and --recipe."""
    family = [n for n in MODULES if n.startswith(method + "-")]
    if not family:
        if recipe is not None:
            raise SagekitError(f"--recipe applies to --method {', '.join(families())}, not to {method}")
        get(method)  # a one-line error for an unknown name
        return OLD_NAMES.get(method, method)
    recipes = [n[len(method) + 1:] for n in family]
    if recipe is None:
        return family[0]
    if recipe not in recipes:
        raise SagekitError(f"--recipe must be {' or '.join(recipes)}, not '{recipe}'")
    return f"{method}-{recipe}"


def families() -> list[str]:
    return sorted({n.split("-")[0] for n in MODULES if "-" in n})


def cli_label(name: str) -> str:
    """How the CLI spells a method: `sage --recipe paper` for sage-paper."""
    family, _, recipe = name.partition("-")
    return f"{family} --recipe {recipe}" if recipe else name


def cli_labels() -> list[str]:
    return list(dict.fromkeys(n.split("-")[0] for n in MODULES))
