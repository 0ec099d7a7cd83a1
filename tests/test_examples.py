"""Run the examples in ``examples/`` with their smoke settings, as Pyro's tests/test_examples.py does.

To add an example, append its command line (relative to ``examples/``) to ``EXAMPLES``
and the files it must write (relative to ``--output-dir``) to ``OUTPUTS``. Every command
gets ``--output-dir <tmp_path>`` appended, so examples must accept that flag.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = ROOT / "examples"

EXAMPLES = [
    "quickstart.py --smoke",
    "digits_inverse_problems.py --smoke",
    "likelihoods.py --smoke",
    "hierarchical.py --smoke",
    "latent_space.py --smoke",
    "model_comparison.py --smoke",
]

OUTPUTS = {
    "quickstart.py": ["quickstart.png"],
    "digits_inverse_problems.py": ["digits_inverse_problems.png"],
    "likelihoods.py": ["likelihoods_digits.png", "likelihoods_moons.png"],
    "hierarchical.py": ["hierarchical.png"],
    "latent_space.py": ["latent_space.png"],
    "model_comparison.py": ["model_comparison.png"],
}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_example(example: str, tmp_path: Path) -> None:
    filename, *args = example.split()
    env = dict(os.environ)
    # run against this checkout even when the package is not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / filename), *args, "--output-dir", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{example} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    if "--smoke" in args:  # a smoke run must not pass for a result
        assert "not meaningful" in result.stdout, f"{example} does not say that its --smoke numbers are not meaningful"
    for output in OUTPUTS.get(filename, []):
        path = tmp_path / output
        assert path.is_file() and path.stat().st_size > 0, f"{example} did not write {output}"
