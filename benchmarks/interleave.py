"""Interleaved measurement: the order of the rounds and the statistics of their ratios.

A shared 2-core machine drifts by tens of per cent within minutes (other jobs start and stop), so
two configurations measured one after the other compare the machine's moods as much as the code.
Here every configuration of a group is measured once per round, the rounds repeat, and each
comparison is the ratio of two measurements taken in the same round, minutes apart at most. The
order within a round alternates (A B C, then C B A), so a steady drift favours nobody on average.
What is reported per comparison is the median of the per-round ratios, with their quartiles and
their range: the spread says how far one round's ratio can be trusted.
"""

from __future__ import annotations

from typing import Sequence


def round_order(members: Sequence[str], round_index: int) -> list[str]:
    """The members in the order round `round_index` measures them (even: as given, odd: reversed)."""
    return list(members) if round_index % 2 == 0 else list(reversed(members))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("no values")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict:
    """median, quartiles, min and max of `values` (the per-round ratios of one comparison)."""
    return {"n": len(values), "median": quantile(values, 0.5), "q1": quantile(values, 0.25),
            "q3": quantile(values, 0.75), "min": min(values), "max": max(values)}


def paired_ratios(results: Sequence[dict], member: str, anchor: str) -> list[float]:
    """samples/s of `member` over that of `anchor`, one ratio per round both were measured in."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        by_round.setdefault(r["round"], {})[r["member"]] = r["samples_per_s"]
    return [rates[member] / rates[anchor] for _, rates in sorted(by_round.items())
            if member in rates and anchor in rates]


def verdict(stats: dict, margin: float = 0.02) -> str:
    """How a switch's on/off ratio reads: "pays" when the median gains more than `margin` and
    the lower quartile is above 1, "costs" in the mirror case, otherwise "no clear difference"."""
    if stats["median"] > 1 + margin and stats["q1"] > 1:
        return "pays"
    if stats["median"] < 1 - margin and stats["q3"] < 1:
        return "costs"
    return "no clear difference"
