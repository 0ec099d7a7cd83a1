"""One process of tests/test_distributed.py, launched by torchrun: ``distributed_worker.py OUT_DIR``.

Every rank trains the same small ScoreNets with ``fit`` (which initialises the gloo process group
from torchrun's environment) and saves what it got to ``OUT_DIR/<case>_rank<r>.pt``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_scoreflow import VPSDE, datasets
from pyro_scoreflow import distributed as D
from pyro_scoreflow.networks import ScoreNet
from pyro_scoreflow.training import fit

TINY = {"hidden": 16, "num_layers": 1, "embed_dim": 8}
# the cases compared with single-process training in the parent test: fit's keyword arguments
CASES = {
    "float32": {"steps": 20, "batch_size": 32, "lr": 1e-2, "seed": 7, "grad_clip": 0.1},
    "float64": {"steps": 20, "batch_size": 32, "lr": 1e-2, "seed": 8, "grad_clip": 0.1, "weighting": "likelihood"},
}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    x = datasets.load("moons", 200, seed=0)
    return x, (x[:, 1] > 0).long()


def net(case: str, init_seed: int) -> ScoreNet:
    torch.manual_seed(init_seed)
    if case == "float64":
        return ScoreNet(VPSDE(), (2,), num_classes=2, **TINY).double()
    return ScoreNet(VPSDE(), (2,), **TINY)


def save(out: Path, case: str, model: torch.nn.Module) -> None:
    history = model.fit_history
    torch.save(
        {"state": model.state_dict(), "raw": history.raw_state_dict, "loss": history.loss},
        out / f"{case}_rank{D.rank()}.pt",
    )


def main(out: Path) -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y = data()
    errors = []
    for bad in (x, DataLoader(TensorDataset(x), batch_size=9)):  # the group is initialised by the first call
        try:
            fit(net("float32", 0), VPSDE(), bad, steps=2, batch_size=33, lr=1e-3, progress=False)
        except ValueError as err:
            errors.append(str(err))
    # different initial weights on every rank: DistributedDataParallel broadcasts rank 0's
    models = {}
    for case, kwargs in CASES.items():
        context = y if case == "float64" else None
        models[case] = fit(net(case, D.rank()), VPSDE(), x, context=context, progress=case == "float32", **kwargs)
        save(out, case, models[case])
    loader = DataLoader(TensorDataset(x, y.float()[:, None]), batch_size=32, shuffle=True)
    torch.manual_seed(D.rank())
    conditional = ScoreNet(VPSDE(), (2,), context_dim=1, **TINY)
    save(out, "loader", fit(conditional, VPSDE(), loader, steps=10, batch_size=32, lr=1e-2, seed=3, progress=False))
    # training the returned model again, with seed=None: rank 0 draws the seed, every rank uses it
    torch.manual_seed(100 + D.rank())
    save(out, "unseeded", fit(models["float32"], VPSDE(), x, steps=5, batch_size=32, lr=1e-2, progress=False))
    if D.rank() == 0:  # the returned module is a plain one: a backward pass on one rank needs no other
        models["float32"](x, torch.rand(len(x))).square().sum().backward()
    D.barrier()
    info = {"rank": D.rank(), "world_size": D.world_size(), "main": D.is_main_process(), "errors": errors,
            "seconds": time.perf_counter() - start}  # fmt: skip
    (out / f"info_rank{D.rank()}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
