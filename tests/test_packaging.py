"""What an installed grasp_jax offers a user's editor and REPL."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import grasp_jax as gj


def test_merging_comes_with_the_package_and_signatures_read_plainly():
    assert gj.merging.merge_streaming is not None  # no second import needed
    signature = str(inspect.signature(gj.summed_gradients))
    assert signature.endswith("state: 'Any | None' = None) -> 'Any'")
    assert (Path(gj.__file__).parent / "py.typed").exists()  # typed (PEP 561)


def test_only_grasp_jax_is_installed_as_a_package(tmp_path):
    """`experiments` and `data` run from the checkout (`python -m experiments.main` in
    the repository root); installed, they would be top-level packages named `data` and
    `experiments` in every program of the environment."""
    script = (
        "import importlib.util as u\n"
        "for name in ('grasp_jax', 'experiments', 'data'):\n"
        "    spec = u.find_spec(name)\n"
        "    print(name, spec.origin if spec else None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    found = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert found["grasp_jax"] == str(Path(gj.__file__))
    repo = str(Path(gj.__file__).parents[1])
    assert not found["experiments"].startswith(repo), found["experiments"]
    assert not found["data"].startswith(repo), found["data"]
