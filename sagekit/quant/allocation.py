"""Bit allocation: per-matrix rate options that land the model's true bits on a target.

A ladder is the rate options a layout offers, cheapest first, each with the relative squared error it is
expected to leave on Gaussian weights (what a rotation makes them): the grid's bits with the Lloyd-Max error,
or the vq recipe's run lengths with the error of a 256-entry codebook. Minimise sum_m s_m * D(option_m)
subject to sum_m bytes_m(option_m) <= target * weights / 8, where s_m is the matrix's sensitivity. Greedy on
the best error drop per extra byte is optimal here up to one step, because D is convex along the ladder; a
last pass spends what is left on any upgrade that still fits, so the result lands within one small matrix's
upgrade (about 0.001 bits on the demo model) under the target.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable

from sagekit.errors import SagekitError

# relative MSE of the optimal b-bit scalar quantiser of a unit Gaussian (Lloyd-Max), b = 1..8
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499, 6: 0.0006642, 7: 0.0001719,
                 8: 0.0000441}
BITS_LADDER = list(LLOYD_MAX_MSE.items())


def allocate(sizes: dict[str, tuple[int, int]], nbytes: Callable[[int, int, Any], int], target_bpw: float,
             sensitivity: dict[str, float], ladder: list[tuple[Any, float]] = BITS_LADDER) -> dict[str, Any]:
    """The ladder option per matrix name; nbytes(out, in, option) is the layout's stored size of one matrix."""
    weights = sum(o * i for o, i in sizes.values())
    budget = target_bpw * weights / 8
    rung = dict.fromkeys(sizes, 0)
    spent = sum(nbytes(*sizes[n], ladder[0][0]) for n in sizes)
    if spent > budget:
        lowest = 8 * spent / weights
        raise SagekitError(f"--target-bpw {target_bpw} is below what the cheapest codes cost ({lowest:.3f} true "
                           "bits): ask for at least that")

    def step(n: str) -> tuple[float, float, str]:
        (here, err), (up, err_up) = ladder[rung[n]], ladder[rung[n] + 1]
        gain = sensitivity[n] * (err - err_up)
        cost = nbytes(*sizes[n], up) - nbytes(*sizes[n], here)
        return (-gain / cost if cost > 0 else -float("inf")), cost, n  # free: a codebook can outweigh codes

    heap = [step(n) for n in sorted(sizes) if len(ladder) > 1]
    heapq.heapify(heap)
    while heap:
        _, cost, n = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this one no longer fits; a cheaper upgrade further down may
        rung[n] += 1
        spent += cost
        if rung[n] + 1 < len(ladder):
            heapq.heappush(heap, step(n))
    return {n: ladder[r][0] for n, r in rung.items()}
