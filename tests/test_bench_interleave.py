"""benchmarks/interleave.py: the round order and the statistics of per-round ratios that
benchmarks/RESULTS.md and RESULTS_device.md report."""

import sys

import numpy as np
import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from interleave import paired_ratios, quantile, round_order, spread, verdict  # noqa: E402


def test_rounds_alternate_the_order():
    assert round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    assert round_order(["a", "b", "c"], 2) == ["a", "b", "c"]


@pytest.mark.parametrize("q", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_quantile_is_numpys_linear_one(q):
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    assert quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)))


def test_ratios_pair_measurements_of_the_same_round():
    results = [{"round": 0, "member": "ek", "samples_per_s": 200.0},
               {"round": 0, "member": "st", "samples_per_s": 100.0},
               {"round": 1, "member": "st", "samples_per_s": 50.0},
               {"round": 1, "member": "ek", "samples_per_s": 150.0},
               {"round": 2, "member": "ek", "samples_per_s": 999.0}]   # no ST in round 2: no ratio
    assert paired_ratios(results, "ek", "st") == [2.0, 3.0]
    s = spread([2.0, 3.0, 2.5, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.75, 2.0, 10.0, 4)


def test_verdict_needs_the_quartile_on_the_same_side():
    assert verdict(spread([1.2, 1.3, 1.25, 1.1, 1.4])) == "pays"
    assert verdict(spread([0.8, 0.85, 0.9, 0.7, 0.75])) == "costs"
    # a median gain whose lower quartile is below 1 is not called a gain
    assert verdict(spread([0.7, 0.9, 1.1, 1.2, 1.3])) == "no clear difference"
