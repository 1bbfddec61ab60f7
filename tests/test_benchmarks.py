"""The benchmarks run end to end and write their JSON and plot (numbers are not judged)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_px_scores_quick_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "px.json", tmp_path / "px.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_px_scores", "--quick", "--models", "resnet20",
         "--rounds", "1", "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out_json.read_text())
    assert report["machine"]["torch"]
    models = [row["model"] for row in report["rows"]]
    assert models == ["resnet20", "resnet20 prune 1 rounds"]
    for row in report["rows"]:
        assert row["pxkern_per_forward"] > 0 and row["speedup_vs_authors"] > 0
    assert out_png.stat().st_size > 0


def test_bench_px_scores_breakdown_accounts_for_every_round(tmp_path):
    out_json, out_png = tmp_path / "breakdown.json", tmp_path / "breakdown.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_px_scores", "--breakdown", "--quick", "--rounds", "3",
         "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert [row["round"] for row in rows] == [1, 2, 3]
    # ResNet-20 on the CPU scores on the fused plan's program: its stage ran (its profiler
    # range was found), the Python plan's and the stream path's did not, and the parts add
    # up to the round.
    ran, idle = ("program", "setup", "select"), ("forward", "backward", "A", "B", "C")
    for row in rows:
        assert all(row[f"{stage}_ms"] > 0 for stage in ran), row
        assert all(row[f"{stage}_ms"] == 0 for stage in idle), row
        parts = sum(row[f"{stage}_per_forward"] for stage in ran)
        assert row["round_per_forward"] == pytest.approx(parts)
    assert "plan program" in result.stdout and "stream A" not in result.stdout and "mean" in result.stdout
    # Every kernel group was found in the profile, and the kernels are part of the prune.
    summary = report["summary"]
    assert set(summary["kernel_seconds"]) == {"A and B convolutions", "C convolutions", "ReLU gates"}
    assert all(seconds > 0 for seconds in summary["kernel_seconds"].values()), summary
    assert summary["kernels_total_s"] < summary["prune_profiled_s"]
    assert summary["ceiling_speedup"] > summary["profiled_speedup"] > 0
    assert "a prune that ran only these kernels" in result.stdout
    assert out_png.stat().st_size > 0


def test_bench_round_overhead_quick_splits_each_round(tmp_path):
    out_json, out_png = tmp_path / "overhead.json", tmp_path / "overhead.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_round_overhead", "--quick", "--repeats", "2",
         "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out_json.read_text())["rows"]
    assert [row["round"] for row in rows] == [1, 3, 5]
    for row in rows:
        # Every scoring ran convolutions and gates among its calls; the split adds up.
        assert row["calls"] > row["kernel_calls"] > 20, row
        assert 0 < row["kernels_ms"] < row["all_calls_ms"] and 0 < row["scoring_ms"], row
        assert row["small_ops_ms"] == pytest.approx(row["all_calls_ms"] - row["kernels_ms"])
        assert row["python_ms"] == pytest.approx(row["scoring_ms"] - row["all_calls_ms"])
        assert row["program_ms"] > 0
        assert row["program_overhead_ms"] == pytest.approx(row["program_ms"] - row["all_calls_ms"])


def test_bench_bsr_quick_writes_json_and_plot(tmp_path):
    out_json, out_png = tmp_path / "bsr.json", tmp_path / "bsr.png"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_bsr", "--quick",
         "--json", str(out_json), "--plot", str(out_png)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out_json.read_text())
    assert report["machine"]["torch"]
    rows = report["rows"]
    assert [row["density"] for row in rows] == [0.5, 0.2, 0.1, 0.05, 0.02]
    for row in rows:
        assert (row["shape"], row["block"], row["batch"], row["n"]) == ("square2048", 32, 1, 256)
        for key in ("dense_ms", "ideal_ms", "torch_bsr_ms", "torch_csr_ms", "pxkern_ms",
                    "pxkern_vs_ideal", "best_pxkern_vs_ideal", "speedup_vs_torch_bsr", "speedup_vs_torch_csr",
                    "speedup_vs_dense", "pxkern_useful_gflops"):
            assert row[key] > 0, key
    assert out_png.stat().st_size > 0


@pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
def test_bench_sparse_inference_prunes_every_layer_and_checks_each():
    """Each layer keeps ceil(density * blocks) of its blocks; the run converts both layers
    and reports their error."""
    from torch import nn

    from benchmarks.bench_sparse_inference import Case, pruned, run

    case = Case("two linears", lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 128)), (3, 64))
    model = pruned(case, 0.1, (16, 16))
    for layer, kept in ((model[0], 2), (model[2], 4)):  # 16 blocks -> 2, 32 blocks -> 4
        blocks = layer.weight.detach().reshape(layer.weight.shape[0] // 16, 16, -1, 16).abs().sum((1, 3))
        assert int((blocks > 0).sum()) == kept
    row = run(case, 0.1, (16, 16), repeats=1)
    assert row["converted_layers"] == 2 and row["max_relative_error"] < 1e-5
