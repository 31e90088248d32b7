"""The pictures: what a confusion matrix shows, checked pixel by pixel against matplotlib's
colour map of row shares computed by hand."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from experiments.report import plots


def test_confusion_matrix_cells_have_the_colour_of_their_row_share(tmp_path):
    counts = [[8, 2, 0], [0, 0, 0], [1, 1, 2]]  # the middle class never occurs
    shares = [[0.8, 0.2, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]]
    plots.confusion_matrix_png(counts, ["a", "b", "c"], tmp_path / "cm.png", "title")
    pixels = np.asarray(Image.open(tmp_path / "cm.png").convert("RGB"))

    def colour(share):
        return tuple((np.asarray(colormaps["Blues"](share)[:3]) * 255).round().astype(int))

    # cell (0, 0) is the only one of its colour: its extent places the grid
    ys, xs = np.nonzero((pixels == colour(0.8)).all(axis=-1))
    cell = plots.CONFUSION_CELL_PX
    assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (cell, cell)
    top, left = ys.min(), xs.min()
    for i, row in enumerate(shares):
        for j, share in enumerate(row):
            corner = pixels[top + i * cell + 2, left + j * cell + 2]
            assert tuple(corner) == colour(share), (i, j)


def test_confusion_matrix_makes_room_for_long_class_names(tmp_path):
    counts = np.eye(2, dtype=int).tolist()
    plots.confusion_matrix_png(counts, ["a", "b"], tmp_path / "short.png", "t")
    plots.confusion_matrix_png(counts, ["a", "b" * 30], tmp_path / "long.png", "t")
    short = Image.open(tmp_path / "short.png").size
    long = Image.open(tmp_path / "long.png").size
    assert long[0] > short[0] + 100 and long[1] > short[1] + 100
