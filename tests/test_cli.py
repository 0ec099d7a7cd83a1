"""The ``pyro-scoreflow`` command line, end to end on tiny settings."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pyro_scoreflow import datasets
from pyro_scoreflow.checkpoint import read_config
from pyro_scoreflow.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--hidden", "16", "--num-layers", "1", "--embed-dim", "8", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_module(*args, cwd=None):
    """``python -m pyro_scoreflow ARGS`` in a subprocess, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYRO_SCOREFLOW_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "pyro_scoreflow", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


def assert_clean_failure(result, match):
    """Non-zero exit, exactly one line on stderr that mentions ``match``, no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and re.search(match, lines[0]), lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint trained by ``train`` on a tiny .npy file (20 steps)."""
    tmp = tmp_path_factory.mktemp("cli")
    data = tmp / "data.npy"
    np.save(data, datasets.load("moons", 200, seed=1).numpy())
    out = tmp / "ck"
    assert main(["train", str(data), "--output-dir", str(out), "--steps", "20", "--batch-size", "32", *TINY_NET]) == 0
    return out


def test_train_on_a_npy_file(trained):
    config = read_config(trained)
    assert config["event_shape"] == [2] and config["sde"]["type"] == "VPSDE"
    training = config["metadata"]["training"]
    assert training["steps"] == 20 and training["npy"] == "data.npy" and training["train_size"] == 180


def test_train_on_a_named_data_set(tmp_path, capsys):
    out = tmp_path / "named"
    argv = [
        "train", "moons", "--output-dir", str(out), "--steps", "20", "--num-data", "300", "--sde", "subvp",
        "--seed", "3", "--lr", "1e-3", "--batch-size", "64", *TINY_NET,
    ]  # fmt: skip
    assert main(argv) == 0
    assert "saved" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    config = read_config(out)
    assert config["sde"]["type"] == "SubVPSDE" and config["metadata"]["training"]["dataset"] == "moons"


def test_sample_and_plot(trained, tmp_path, capsys):
    out, png = tmp_path / "s.npy", tmp_path / "plots" / "s.png"
    args = ["sample", str(trained), "--num-samples", "30", "--output", str(out), "--plot", str(png)]
    assert main([*args, "--sampler", "ode", "--seed", "1"]) == 0
    samples = np.load(out)
    assert samples.shape == (30, 2) and np.isfinite(samples).all()
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "drew 30 samples" in capsys.readouterr().out
    assert main([*args, "--sampler", "ode", "--seed", "1"]) == 0
    np.testing.assert_array_equal(np.load(out), samples)  # seeded


def test_sample_shipped_digits_as_an_image_grid(tmp_path):
    out, png = tmp_path / "d.npy", tmp_path / "d.png"
    argv = ["sample", "digits", "--num-samples", "4", "--output", str(out), "--plot", str(png)]
    assert main([*argv, "--sampler", "dpm-solver", "--num-steps", "10"]) == 0
    assert np.load(out).shape == (4, 64) and png.read_bytes()[:8] == PNG_MAGIC


def test_log_prob_prints_mean_log_p_and_bits_per_dim(trained, tmp_path, capsys):
    points = tmp_path / "x.npy"
    np.save(points, datasets.load("moons", 25, seed=9).numpy().astype(np.float64))
    out = tmp_path / "lp.npy"
    assert main(["log-prob", str(trained), str(points), "--output", str(out)]) == 0
    stdout = capsys.readouterr().out
    mean = float(re.search(r"mean log p: (\S+) nats", stdout).group(1))
    bits = float(re.search(r"mean bits/dim: (\S+)", stdout).group(1))
    log_p = np.load(out)
    assert log_p.shape == (25,) and np.isfinite(log_p).all()
    assert mean == pytest.approx(log_p.mean(), abs=1e-4)
    assert bits == pytest.approx(-mean / (2 * math.log(2)), abs=1e-3)
    assert main(["log-prob", str(trained), str(points), "--divergence", "hutchinson", "--rtol", "1e-3"]) == 0
    assert "hutchinson divergence" in capsys.readouterr().out
    args = ["log-prob", str(trained), str(points), "--divergence", "hutchinson", "--hutchinson-redraw"]
    assert main(args + ["--rtol", "1e-3"]) == 0
    assert "hutchinson divergence" in capsys.readouterr().out


def test_demo_smoke(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--smoke"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out log-likelihood" in stdout and "effective sample size" in stdout
    for name in ("prior.png", "posterior.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:8] == PNG_MAGIC


def test_python_m_help_and_clean_failure(tmp_path, capsys):
    result = run_module("--help")
    assert result.returncode == 0
    for command in ("demo", "train", "sample", "log-prob"):
        assert command in result.stdout
    assert_clean_failure(
        run_module("sample", "no-such-prior", "--num-samples", "5", "--output", tmp_path / "x.npy"),
        "no-such-prior.*shipped priors: .*moons",
    )
    for command in ("demo", "train", "sample", "log-prob"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: pyro-scoreflow" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["log-prob", "moons", "{tmp}/missing.npy"], "missing.npy: no such file"),
        (["log-prob", "moons", "{tmp}/text.npy"], "text.npy: not a numeric .npy array"),
        (["log-prob", "moons", "{tmp}/objects.npy"], "objects.npy: not a numeric .npy array"),
        (["log-prob", "moons", "{tmp}/wide.npy"], r"expected an array \(N, 2\)"),
        (["log-prob", "moons", "{tmp}/nan.npy"], "NaN"),
        (["log-prob", "moons", "{tmp}/x.txt"], "must be a .npy file"),
        (["train", "not-a-dataset", "--output-dir", "{tmp}/o"], "neither a data set"),
        (["train", "{tmp}/wide.npy", "--output-dir", "{tmp}", "--steps", "1", "--quiet"], "non-empty directory"),
        (["sample", "{tmp}/model.pt", "--num-samples", "2", "--output", "{tmp}/s.npy"], "pickle"),
        (["sample", "moons", "--num-samples", "2", "--output", "{tmp}/s.txt"], "must be a .npy file"),
        (["sample", "moons", "--num-samples", "0", "--output", "{tmp}/s.npy"], "positive integer"),
        (["sample", "moons", "--num-samples", "2", "--output", "{tmp}/s.npy", "--sampler", "magic"], "invalid choice"),
        (["train", "moons", "--output-dir", "{tmp}/o", "--steps", "-3"], "--steps: expected a positive integer"),
        ([], "required: COMMAND"),
        (
            ["sample", "moons", "--num-samples", "2", "--output", "{tmp}/s.npy", "--device", "warp9"],
            "not a torch device",
        ),
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "text.npy").write_text("not an array")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "wide.npy", np.zeros((4, 3)))
    np.save(tmp_path / "nan.npy", np.full((2, 2), np.nan))
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse errors
        code = exit.code
    assert code != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(match, lines[0]), lines[0]
