"""The ``pyro-scoreflow`` command line, end to end on tiny settings."""

import contextlib
import math
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_scoreflow import ScoreSDEPrior, datasets, plotting
from pyro_scoreflow.checkpoint import read_config
from pyro_scoreflow.cli import main
from pyro_scoreflow.commands import load_npy, sampler_text, save_npy
from pyro_scoreflow.distribution import SAMPLERS

MISSING = "plotting needs matplotlib: pip install 'pyro_scoreflow[plots]'"

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--hidden", "16", "--num-layers", "1", "--embed-dim", "8", "--quiet"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_module(*args, cwd=None, python_options=()):
    """``python -m pyro_scoreflow ARGS`` in a subprocess, one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("PYRO_SCOREFLOW_DEBUG", None)
    command = [sys.executable, *python_options, "-m", "pyro_scoreflow", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)


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


def test_hutchinson_redraw_reaches_the_prior(trained, tmp_path, capsys):
    """With the same seed, fixed probes and redrawn probes give different per-point values (an ignored flag
    would give bitwise the same ones), and each is reproducible."""
    points = tmp_path / "x.npy"
    np.save(points, datasets.load("moons", 10, seed=9).numpy())
    base = ["log-prob", str(trained), str(points), "--divergence", "hutchinson", "--rtol", "1e-3", "--seed", "4"]
    runs = {}
    for name, extra in [("fixed", []), ("redraw", ["--hutchinson-redraw"]), ("redraw_again", ["--hutchinson-redraw"])]:
        assert main([*base, *extra, "--output", str(tmp_path / f"{name}.npy")]) == 0
        runs[name] = (np.load(tmp_path / f"{name}.npy"), capsys.readouterr().out)
    assert "fixed along the trajectory" in runs["fixed"][1]
    assert "redrawn at every evaluation" in runs["redraw"][1]
    np.testing.assert_array_equal(runs["redraw"][0], runs["redraw_again"][0])  # seeded, so deterministic
    assert np.abs(runs["redraw"][0] - runs["fixed"][0]).max() > 1e-4


def test_demo_smoke(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--smoke"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out log-likelihood" in stdout and "effective sample size" in stdout
    for name in ("prior.png", "posterior.png"):
        assert (tmp_path / "demo" / name).read_bytes()[:8] == PNG_MAGIC


def test_python_m_help_and_clean_failure(tmp_path, capsys):
    result = run_module("--help", python_options=["-X", "importtime"])  # the import log goes to stderr
    assert result.returncode == 0
    imported = {line.rpartition("|")[2].strip() for line in result.stderr.splitlines()}
    assert "pyro_scoreflow.plotting" in imported and "matplotlib" not in imported  # imported when drawing only
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
            "must name a torch device",
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


# -- hostile files, unwritable targets, unbounded counts (issue 11, item 15) ------------------------------------
def one_line_error(capsys, argv):
    """Run ``main(argv)``; return its one-line stderr message (asserting a non-zero exit and no traceback)."""
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse errors
        code = exit.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0], captured.out


def write_npy_header(path, shape, data=b""):
    """A .npy file whose header claims ``shape`` (float32) followed by ``data``."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(data)


@pytest.mark.parametrize("shape", [(10**12, 2), (2**40, 2**20), (100, 2)])
def test_npy_header_claiming_more_data_than_the_file_holds(tmp_path, capsys, shape):
    bad = tmp_path / "bad.npy"
    write_npy_header(bad, shape, data=b"\0" * 64)  # 8 float32 pairs, whatever the header claims
    message, _ = one_line_error(capsys, ["log-prob", "moons", str(bad)])
    assert "bad.npy: the header claims an array of shape" in message and "holds 64 bytes" in message
    message, stdout = one_line_error(capsys, ["train", str(bad), "--output-dir", str(tmp_path / "ck"), "--quiet"])
    assert "the header claims" in message and "training" not in stdout


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int64, np.uint8])
@pytest.mark.parametrize("fortran", [False, True])
def test_load_npy_agrees_with_numpy(tmp_path, dtype, fortran):
    array = (np.arange(24).reshape(4, 3, 2) % 7).astype(dtype)
    array = np.asfortranarray(array) if fortran else array
    np.save(tmp_path / "a.npy", array)
    loaded = load_npy(tmp_path / "a.npy")
    assert loaded.dtype == (torch.float64 if dtype == np.float64 else torch.float32)
    np.testing.assert_array_equal(loaded.numpy(), np.load(tmp_path / "a.npy"))


def test_train_to_an_unwritable_output_dir_fails_before_training(tmp_path, capsys):
    data = tmp_path / "data.npy"
    np.save(data, datasets.load("moons", 50, seed=1).numpy())
    (tmp_path / "file.txt").write_text("a file, not a directory")
    argv = ["train", str(data), "--output-dir", str(tmp_path / "file.txt" / "ck"), "--steps", "20", *TINY_NET]
    message, stdout = one_line_error(capsys, argv)
    assert "--output-dir" in message and "file.txt is not a directory" in message
    assert "training" not in stdout  # refused before the network was built


def test_train_to_a_read_only_place_fails_before_training(tmp_path, capsys):
    """A directory where no entry can be made (``/sys`` refuses even root, unlike a chmod 555 directory)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        pass
    else:
        pytest.skip("/sys is writable here")
    data = tmp_path / "data.npy"
    np.save(data, datasets.load("moons", 50, seed=1).numpy())
    message, stdout = one_line_error(capsys, ["train", str(data), "--output-dir", "/sys/pyro_scoreflow_ck", *TINY_NET])
    assert "--output-dir /sys/pyro_scoreflow_ck: cannot write in /sys" in message and "training" not in stdout


def test_sample_to_an_unwritable_output_fails_before_sampling(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a directory")
    argv = ["sample", "moons", "--num-samples", "5", "--output", str(tmp_path / "file.txt" / "s.npy")]
    message, stdout = one_line_error(capsys, argv)
    assert message.startswith("pyro-scoreflow sample: error: --output") and "is not a directory" in message
    assert stdout == ""
    (tmp_path / "d.npy").mkdir()
    message, stdout = one_line_error(capsys, [*argv[:4], "--output", str(tmp_path / "d.npy")])
    assert message.endswith("d.npy is a directory") and stdout == ""


def test_log_prob_refuses_to_overwrite_its_input(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    points = tmp_path / "x.npy"
    np.save(points, datasets.load("moons", 5, seed=9).numpy())
    before = points.read_bytes()
    os.link(points, tmp_path / "hard.npy")
    for output in (points, tmp_path / "sub" / ".." / "x.npy", tmp_path / "hard.npy"):
        message, stdout = one_line_error(capsys, ["log-prob", "moons", str(points), "--output", str(output)])
        assert "is the input file" in message and stdout == ""
    assert points.read_bytes() == before


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sample", "moons", "--num-samples", "2", "--num-steps", "1000000000"], "--num-steps: .* at most 100000"),
        (["sample", "moons", "--num-samples", "1000000000"], "--num-samples: .* at most 1000000"),
        (["sample", "moons", "--num-samples", "2", "--batch-size", "1000000000"], "--batch-size: .* at most 100000"),
        (["log-prob", "moons", "x.npy", "--batch-size", "1000001"], "--batch-size: .* at most 100000"),
        (["log-prob", "moons", "x.npy", "--hutchinson-samples", "10**9"], "--hutchinson-samples: .* at most"),
        (["train", "moons", "--output-dir", "o", "--batch-size", "100001"], "--batch-size: .* at most 100000"),
        (["demo", "--num-samples", "1000001"], "--num-samples: .* at most 1000000"),
    ],
)
def test_counts_are_bounded(tmp_path, capsys, argv, match):
    if argv[0] == "sample":
        argv = [*argv, "--output", str(tmp_path / "s.npy")]
    message, _ = one_line_error(capsys, argv)
    assert re.search(match, message), message


def test_help_states_the_bounds(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "solver steps, at most 100000" in help_text and "number of samples, at most 1000000" in help_text


def test_outputs_are_written_atomically(tmp_path, capsys, monkeypatch):
    """A write that fails half-way (a full disk) leaves the previous file as it was, and no temporary."""
    out = tmp_path / "s.npy"
    np.save(out, np.zeros(3))
    os.chmod(out, 0o640)
    before = out.read_bytes()

    def full_disk(file, array, **kwargs):
        with open(file, "wb") if isinstance(file, (str, os.PathLike)) else contextlib.nullcontext(file) as f:
            f.write(b"\x93NUMPY half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(np, "save", full_disk)
        message, _ = one_line_error(capsys, ["sample", "moons", "--num-samples", "3", "--output", str(out)])
    assert "No space left on device" in message
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]
    assert main(["sample", "moons", "--num-samples", "3", "--output", str(out), "--num-steps", "5"]) == 0
    assert np.load(out).shape == (3, 2) and stat.S_IMODE(out.stat().st_mode) == 0o640  # replaced, mode kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy"]
    umask = os.umask(0o022)
    try:
        new = save_npy(tmp_path / "new" / "n.npy", torch.arange(3.0))  # a new file gets open()'s mode
        assert stat.S_IMODE(new.stat().st_mode) == 0o644 and np.load(new).tolist() == [0.0, 1.0, 2.0]
    finally:
        os.umask(umask)


# -- samplers -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sample_accepts_every_sampler_of_the_prior(tmp_path, capsys, sampler):
    out = tmp_path / "s.npy"
    argv = ["sample", "moons", "--num-samples", "3", "--output", str(out), "--sampler", sampler, "--num-steps", "8"]
    assert main(argv) == 0
    samples = np.load(out)
    assert samples.shape == (3, 2) and np.isfinite(samples).all()
    stdout = capsys.readouterr().out
    prior = ScoreSDEPrior.from_pretrained("moons", sampler=sampler, num_steps=8)
    assert f"({sampler_text(prior)})" in stdout
    if sampler == "dpm-solver":
        assert f"DPM-Solver++ multistep of order {prior.dpm_order} with UniC corrector, 8 steps" in stdout


# -- matplotlib is optional ---------------------------------------------------------------------------------------
@pytest.fixture
def no_matplotlib(monkeypatch):
    """Make ``import matplotlib`` (and its submodules) fail as if it were not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def test_sample_plot_without_matplotlib_fails_before_sampling(tmp_path, capsys, no_matplotlib):
    out = tmp_path / "s.npy"
    message, stdout = one_line_error(
        capsys, ["sample", "moons", "--num-samples", "3", "--output", str(out), "--plot", str(tmp_path / "s.png")]
    )
    assert message == f"pyro-scoreflow sample: error: --plot: {MISSING}"
    assert stdout == "" and not out.exists()
    with pytest.raises(plotting.MissingMatplotlibError, match=re.escape(MISSING)):
        plotting.plot_samples(torch.zeros(3, 2), tmp_path / "s.png")


def test_demo_without_matplotlib_prints_its_numbers_and_no_figures(tmp_path, capsys, no_matplotlib):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--smoke"]) == 0
    stdout = capsys.readouterr().out
    assert "held-out log-likelihood" in stdout and "effective sample size" in stdout
    assert f"no figures: {MISSING}" in stdout and not (tmp_path / "demo").exists()
