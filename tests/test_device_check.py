"""benchmarks/device_check.py: its dry mode runs every section on CPU and writes the report's
full shape; a section that raises, dies or hangs is recorded and the others still run. (The
check itself runs only on a CUDA machine: `make device-check`.)"""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import device_check  # noqa: E402


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "RESULTS_device.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/device_check.py", "--dry", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())
    assert text.startswith("# Device check: dry run, CPU, not a measurement")
    assert list(raw["sections"]) == list(device_check.SECTIONS)
    for name, result in raw["sections"].items():
        assert f"## {name}" in text
        assert result["status"] == "ok", (name, result.get("summary"), result.get("reason"))
    # the numerical checks ran and are listed, not just the section headings
    checks = [c for r in raw["sections"].values() for c in r.get("checks", [])]
    assert len(checks) >= 10 and all(c["passed"] for c in checks)
    assert "| length 16 | 16 | st |" in text and "GradCache 128 (mini-batch 16)" in text


def _fine(ctx):
    return {"status": "ok", "summary": f"deadline in {ctx['deadline'] - time.time():.0f} s"}


def _raises(ctx):
    raise ValueError("a broken section")


def _dies(ctx):
    os._exit(3)


def _hangs(ctx):
    time.sleep(60)


def test_a_broken_section_is_recorded_and_the_others_still_run():
    sections = {"first": _fine, "raises": _raises, "dies": _dies, "hangs": _hangs, "last": _fine}
    caps = {name: 3 for name in sections}
    results = device_check.run_sections(sections, {"device": "cpu"}, caps, total_cap=60)
    assert [r["status"] for r in results.values()] == ["ok", "failed", "failed", "failed", "ok"]
    assert "ValueError: a broken section" in results["raises"]["summary"]
    assert "Traceback" in results["raises"]["reason"]
    assert "exit code 3" in results["dies"]["summary"]
    assert "time cap of 3 s" in results["hangs"]["summary"] and results["hangs"]["seconds"] < 10


def test_the_whole_cap_stops_later_sections():
    results = device_check.run_sections({"a": _hangs, "b": _fine}, {"device": "cpu"}, {"a": 4, "b": 4},
                                        total_cap=6)
    assert results["a"]["status"] == "failed"
    assert results["b"]["status"] == "failed" and "whole check's time cap" in results["b"]["summary"]


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989.4e12), ("NVIDIA H100 PCIe", 756.0e12),
                                       ("NVIDIA H100 80GB HBM3", 989.4e12), ("Tesla T4", None)])
def test_peak_flops_by_gpu_name(name, peak):
    assert device_check.peak_bf16(name) == peak


def test_flops_per_sequence_counts_dense_layers_and_attention():
    cfg = {"hidden_size": 768, "num_layers": 12, "intermediate_size": 3072}
    # bert-base at length 128: 6 × 85M dense parameters × 128 tokens, plus attention
    dense = 6 * 12 * (4 * 768**2 + 2 * 768 * 3072) * 128
    attention = 3 * 12 * 4 * 128**2 * 768
    assert device_check._flops_per_sequence(128, cfg) == dense + attention
