"""What an installed grasp_jax offers a user's editor and REPL."""

from __future__ import annotations

import inspect
from pathlib import Path

import grasp_jax as gj


def test_merging_comes_with_the_package_and_signatures_read_plainly():
    assert gj.merging.merge_streaming is not None  # no second import needed
    signature = str(inspect.signature(gj.summed_gradients))
    assert signature.endswith("state: 'Any | None' = None) -> 'Any'")
    assert (Path(gj.__file__).parent / "py.typed").exists()  # typed (PEP 561)
