"""Adaptive saliency threshold: a bounded 1-D search for the salient fraction p of one matrix."""

from collections.abc import Callable

from scipy.optimize import minimize_scalar


def search_fraction(objective: Callable[[float], float], p_max: float, xatol: float = 1e-4) -> tuple[float, float]:
    """Best (p, objective(p)) on [0, p_max] by bounded Brent, with both ends also tried.

    Brent's bounded method never evaluates the ends exactly, yet the optimum often sits there (p = 0
    when salient weights do not pay for their bits, p_max when the rate term is weak). Ties go to the
    smaller p, the cheaper matrix.
    """
    seen: dict[float, float] = {}

    def f(p: float) -> float:
        p = float(p)
        if p not in seen:
            seen[p] = float(objective(p))
        return seen[p]

    f(0.0)
    if p_max > 0.0:
        f(float(p_max))
        minimize_scalar(f, bounds=(0.0, float(p_max)), method="bounded", options={"xatol": xatol})
    p, v = min(seen.items(), key=lambda pv: (pv[1], pv[0]))
    return p, v
