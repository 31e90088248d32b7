"""Refactors keep results: a small embedded experiment gives the pinned numbers."""

from __future__ import annotations

import json

import pytest

from tests import pinned_experiment


def test_per_run_numbers_equal_the_pinned_ones(digits_dir, tmp_path):
    golden = json.loads(pinned_experiment.GOLDEN.read_text())
    runs = pinned_experiment.measure(digits_dir, tmp_path)
    assert sorted(runs) == sorted(golden)
    for name, want in golden.items():
        got = runs[name]
        assert got["test_accuracy"] == want["test_accuracy"], name
        assert got["val_accuracy"] == want["val_accuracy"], name
        # Losses and fractions are floats summed by XLA: equal on one machine, and
        # within float32 rounding where another CPU vectorises differently.
        assert got["val_losses"] == pytest.approx(want["val_losses"], rel=1e-5), name
        assert got["fractions"] == pytest.approx(want["fractions"], rel=1e-5), name
