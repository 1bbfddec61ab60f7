"""Smoke tests of the built-in demo and the command line (tiny settings)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pxkern.cli import main
from pxkern.demo import Demo, run_demo


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's tensors are tiny: one thread is as fast and immune to a busy machine
    (the CLI does the same); restored for the other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_kept(total: int, density: float) -> int:
    """Kept count of the global rule when no scores tie: N - int((1 - d) N)."""
    return total - int((1 - density) * total)


@pytest.mark.parametrize("method", ["px", "magnitude"])
def test_run_demo(method, tmp_path):
    report = run_demo(method, density=0.2, rounds=2, epochs=1, out=tmp_path, progress=False)
    (result,) = report.results
    assert 0.0 <= result.accuracy <= 1.0 and 0.0 <= report.dense_accuracy <= 1.0
    kept = sum(layer.kept for layer in result.layers)
    assert sum(layer.total for layer in result.layers) == report.prunable_weights
    assert kept == expected_kept(report.prunable_weights, 0.2)
    assert result.density == pytest.approx(0.2, abs=1e-4)
    assert result.rounds == (2 if method == "px" else 1)  # magnitude runs one-shot
    assert all(path.exists() for path in report.files)
    saved = json.loads((tmp_path / f"results_{method}.json").read_text())
    assert saved["results"][0]["accuracy"] == result.accuracy


def test_cli_block_runs_both_structures(tmp_path, capsys):
    assert main(["demo", "--density", "0.2", "--rounds", "2", "--epochs", "1", "--block", "8x8",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    output = capsys.readouterr().out
    assert "px 8x8 blocks" in output
    saved = json.loads((tmp_path / "results_px.json").read_text())
    assert [r["block"] for r in saved["results"]] == [None, [8, 8]]
    assert (tmp_path / "accuracy_px.png").exists()


def test_cli_compare(tmp_path, capsys):
    code = main(["demo", "--compare", "--density", "0.3", "--rounds", "2", "--epochs", "1",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for method in ["px", "synflow", "snip", "grasp", "magnitude", "random"]:
        assert f"density per layer ({method})" in printed
    assert "dense: test accuracy" in printed
    assert (tmp_path / "accuracy_compare.png").exists()
    assert (tmp_path / "layer_density_compare.png").exists()


def test_cli_keep_none_transforms_the_classifier(tmp_path, capsys):
    """--keep none reaches px as keep=(): the label and the JSON say so, and the layers keep
    other counts of weights than under the default, at the same global density."""
    argv = ["demo", "--density", "0.2", "--rounds", "2", "--epochs", "1", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "kept")]) == 0
    assert main([*argv, "--keep", "none", "--out", str(tmp_path / "none")]) == 0
    assert "px, classifier transformed" in capsys.readouterr().out

    def layers(run):
        (result,) = json.loads((tmp_path / run / "results_px.json").read_text())["results"]
        assert result["classifier_kept"] == (run == "kept")
        return {layer["name"]: layer["kept"] for layer in result["layers"]}

    kept, transformed = layers("kept"), layers("none")
    assert sum(kept.values()) == sum(transformed.values())  # the same global density
    assert kept != transformed


def test_demo_refuses_keep_classifier_for_other_methods():
    with pytest.raises(ValueError, match="option of method 'px'"):
        Demo().run("magnitude", 0.2, 1, 0, keep_classifier=False)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--density", "0"], "density must be in (0, 1]"),
        (["demo", "--method", "l1"], "invalid choice: 'l1'"),
        (["demo", "--epochs", "0"], "expected an integer >= 1"),
        (["demo", "--block", "8"], "block must look like 8x8"),
        (["demo", "--keep", "fc"], "invalid choice: 'fc'"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


def test_python_dash_m_help():
    completed = subprocess.run(
        [sys.executable, "-m", "pxkern", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--compare" in completed.stdout
