"""Bit allocation for the grid recipe: per-matrix bits that land the model's true bits on a target.

Minimise sum_m s_m * D(b_m) subject to sum_m bytes_m(b_m) <= target * weights / 8, where D(b) is the
relative squared error of b-bit Lloyd-Max levels on Gaussian weights (what a rotation makes them) and s_m
is the matrix's sensitivity. Greedy on the best error drop per extra byte is optimal here up to one step,
because D is convex in b; a last pass spends what is left on any upgrade that still fits, so the result
lands within one small matrix's upgrade (about 0.001 bits on the demo model) under the target.
"""

from __future__ import annotations

import heapq

from sagekit.errors import SagekitError

# relative MSE of the optimal b-bit scalar quantiser of a unit Gaussian (Lloyd-Max), b = 1..8
LLOYD_MAX_MSE = {1: 0.3634, 2: 0.1175, 3: 0.03454, 4: 0.009497, 5: 0.002499, 6: 0.0006642, 7: 0.0001719,
                 8: 0.0000441}


def allocate(sizes: dict[str, tuple[int, int]], nbytes, target_bpw: float, sensitivity: dict[str, float],
             min_bits: int = 1, max_bits: int = 8) -> dict[str, int]:
    """bits per matrix name; nbytes(out, in, bits) is the layout's stored size of one matrix."""
    weights = sum(o * i for o, i in sizes.values())
    budget = target_bpw * weights / 8
    bits = dict.fromkeys(sizes, min_bits)
    spent = sum(nbytes(*sizes[n], min_bits) for n in sizes)
    if spent > budget:
        lowest = 8 * spent / weights
        raise SagekitError(f"--target-bpw {target_bpw} is below what {min_bits}-bit codes cost "
                           f"({lowest:.3f} true bits): ask for at least that")

    def step(n: str) -> tuple[float, float, str]:
        b = bits[n]
        gain = sensitivity[n] * (LLOYD_MAX_MSE[b] - LLOYD_MAX_MSE[b + 1])
        cost = nbytes(*sizes[n], b + 1) - nbytes(*sizes[n], b)
        return -gain / cost, cost, n

    heap = [step(n) for n in sorted(sizes) if bits[n] < max_bits]
    heapq.heapify(heap)
    while heap:
        _, cost, n = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this one no longer fits; a cheaper upgrade further down may
        bits[n] += 1
        spent += cost
        if bits[n] < max_bits:
            heapq.heappush(heap, step(n))
    return bits
