"""The benchmark suite's --quick mode runs end to end (a smoke test: benchmarks measure, never assert)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_benchmark_suite_quick_mode_runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for heading in ("log_prob accuracy", "Accuracy per cost", "Few-step sampling", "Training throughput"):
        assert heading in proc.stdout, heading


@pytest.mark.slow
def test_posterior_benchmark_quick_mode_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    report, figure = tmp_path / "posterior.md", tmp_path / "posterior.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_posterior.py"), "--quick", "--output", str(report),
         "--plot", str(figure)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    for heading in ("Inverse problems with exact-mixture priors", "Targets", "digits prior", "log_prob latency"):
        assert heading in text, heading
    assert figure.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, heading",
    [
        ("langevin_corrector.py", "| SDE | NFE | sampler |"),
        ("trilemma.py", "| prior | sampling"),
        ("few_step_family.py", "| dpm-solver (this package) | 10 |"),
    ],
)
def test_issue_13_benchmarks_quick_mode_run(script, heading):
    """The Langevin-corrector, trilemma and few-step-family scripts run end to end (7-90 s each
    with --quick; the few-step script skips the diffusers rows without diffusers)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert heading in proc.stdout
