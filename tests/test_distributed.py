"""Data-parallel ``fit`` under torchrun: 2 CPU processes (gloo) against single-process training.

The 2-process run (tests/distributed_worker.py) is launched once per module with
``python -m torch.distributed.run``; it takes about 10 s on an idle 2-core machine,
most of it starting the interpreters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import CASES, data, net

from pyro_scoreflow import VPSDE, datasets
from pyro_scoreflow import distributed as D
from pyro_scoreflow.training import fit

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 150  # the run takes 10-25 s; never let a stuck rendezvous hang CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    """Run the worker on 2 ranks; the folder of what they saved and the launcher's output."""
    out = tmp_path_factory.mktemp("ddp")
    env = {k: v for k, v in os.environ.items() if k not in D.TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(WORKER), str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers: their own session
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{output[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}:\n{output[-3000:]}")
    return out, output


def load(out: Path, case: str, rank: int) -> dict:
    return torch.load(out / f"{case}_rank{rank}.pt")


# -- without a process group --------------------------------------------------------------------------
def test_helpers_in_a_single_process(monkeypatch):
    for name in D.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not D.is_initialized()
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main_process()) == (0, 1, 0, True)
    assert D.init_from_env() is False and not D.is_initialized()
    D.barrier()  # a no-op
    # launched by torchrun but not initialised yet: the environment answers
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert (D.rank(), D.world_size(), D.local_rank(), D.is_main_process()) == (1, 2, 1, False)


def test_fit_distributed_argument(monkeypatch):
    for name in D.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    x = datasets.load("moons", 50)
    kwargs = {"steps": 2, "batch_size": 10, "lr": 1e-3, "progress": False}
    with pytest.raises(ValueError, match="distributed"):
        fit(net("float32", 0), VPSDE(), x, distributed="yes", **kwargs)
    with pytest.raises(RuntimeError, match="process group"):
        fit(net("float32", 0), VPSDE(), x, distributed=True, **kwargs)
    a = fit(net("float32", 0), VPSDE(), x, distributed=False, seed=0, **kwargs)
    b = fit(net("float32", 0), VPSDE(), x, seed=0, **kwargs)  # "auto" without a group: one process
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


# -- 2 processes -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "tol"), [("float32", {"rtol": 1e-5, "atol": 1e-6}), ("float64", {"rtol": 1e-11, "atol": 1e-13})]
)
def test_two_processes_match_single_process_training(two_processes, case, tol):
    """Same data, seed and global batch: the 2-process EMA and raw weights and losses are the single-process ones
    (measured max |difference| about 2e-7 in float32 and 4e-16 in float64). Gradient clipping is active (grad_clip
    0.1: training without it ends elsewhere), so it acts on the averaged gradients; rank 1 starts from other
    initial weights (rank 0's are broadcast); the float64 case also slices class labels and importance-samples
    the likelihood weighting's times."""
    out, _ = two_processes
    x, y = data()
    context = y if case == "float64" else None
    single = fit(net(case, 0), VPSDE(), x, context=context, progress=False, **CASES[case])
    ranks = [load(out, case, r) for r in (0, 1)]
    for name, expected in single.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][name], expected, **tol, msg=lambda m, name=name: f"{name}: {m}")
    for name, expected in single.fit_history.raw_state_dict.items():
        torch.testing.assert_close(ranks[0]["raw"][name], expected, **tol)
    torch.testing.assert_close(torch.tensor(ranks[0]["loss"]), torch.tensor(single.fit_history.loss), **tol)
    unclipped = fit(net(case, 0), VPSDE(), x, context=context, progress=False, **{**CASES[case], "grad_clip": None})
    assert any(
        not torch.allclose(p, q, rtol=1e-3, atol=1e-4) for p, q in zip(unclipped.parameters(), single.parameters())
    )


@pytest.mark.slow
@pytest.mark.parametrize("case", [*CASES, "loader", "unseeded"])
def test_every_rank_ends_with_the_same_model(two_processes, case):
    """EMA, raw weights and (averaged) losses are bit-identical on both ranks: tensor data, a shuffling DataLoader
    sharded by a DistributedSampler, and seed=None (rank 0's seed broadcast)."""
    out, _ = two_processes
    r0, r1 = load(out, case, 0), load(out, case, 1)
    for key in ("state", "raw"):
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    assert r0["loss"] == r1["loss"] and all(torch.isfinite(torch.tensor(r0["loss"])))


@pytest.mark.slow
def test_batch_size_must_divide_and_helpers_under_torchrun(two_processes):
    out, output = two_processes
    infos = [json.loads((out / f"info_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(i["rank"], i["world_size"], i["main"]) for i in infos] == [(0, 2, True), (1, 2, False)]
    for info in infos:
        tensor_error, loader_error = info["errors"]
        assert "batch_size (33) must be divisible by the number of processes (2)" in tensor_error
        assert "DataLoader's batch_size (9) must be divisible by the number of processes (2)" in loader_error
    assert output.count("| 0/20 [") == 1  # one progress bar (tqdm prints its start once): rank 0's


@pytest.mark.slow
def test_cli_train_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m pyro_scoreflow train`: one rank prints and writes one loadable checkpoint."""
    from pyro_scoreflow import ScoreSDEPrior

    env = {k: v for k, v in os.environ.items() if k not in D.TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    out = tmp_path / "prior"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "pyro_scoreflow", "train", "moons",
           "--output-dir", str(out), "--steps", "10", "--batch-size", "64", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("training a VPSDE prior") == 1  # rank 0 only
    assert proc.stdout.count("saved ") == 1
    prior = ScoreSDEPrior.from_pretrained(str(out))
    assert prior.sample((3,)).shape == (3, 2)
