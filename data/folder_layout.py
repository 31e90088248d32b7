"""Reads a data set's manual directory: which image belongs to which bin, split and class.

Two layouts are accepted per bin, as the reference's preprocessing leaves them or before
it ran: `<bin>/{train,val,test}/<class>/<file>` (pre-split) and `<bin>/<class>/<file>`
(unsplit; split here 80/10/10 per class). The reference splits in `os.listdir` order,
which differs between machines; we sort file names and shuffle with a seeded generator,
so every machine gets the same split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}


class LayoutError(ValueError):
    """The manual directory does not hold what the builder needs; the message says how."""


@dataclasses.dataclass(frozen=True)
class Example:
    path: Path
    label: int


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (hidden files ignored)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def split_indices(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The reference's proportions: train int(0.8 n), val int(0.1 n), test the rest."""
    order = rng.permutation(n)
    n_train, n_val = int(0.8 * n), int(0.1 * n)
    return {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }


def _class_dirs(folder: Path, class_names: list[str], ignore: tuple[str, ...]) -> dict:
    """Maps each expected class to its folder; errors for missing or unknown classes."""
    present = {p.name for p in folder.iterdir() if p.is_dir()} - set(ignore)
    missing = [c for c in class_names if c not in present]
    unknown = sorted(present - set(class_names))
    if missing:
        raise LayoutError(
            f"{folder}: class folder(s) {missing} are missing (found {sorted(present)}). "
            f"Each bin needs one folder per class: {class_names}."
        )
    if unknown:
        raise LayoutError(
            f"{folder}: unexpected folder(s) {unknown}; expected only the classes "
            f"{class_names}. Remove them, or check that this is the right data set."
        )
    return {c: folder / c for c in class_names}


def detect_layout(bin_dir: Path, class_names: list[str]) -> str:
    """'split' (train/val/test subfolders) or 'unsplit' (class subfolders)."""
    children = {p.name for p in bin_dir.iterdir() if p.is_dir()}
    if set(SPLIT_DIRS.values()) <= children:
        return "split"
    if children & set(class_names):
        return "unsplit"
    raise LayoutError(
        f"{bin_dir}: unknown layout (subfolders {sorted(children)}). Expected either "
        f"train/, val/ and test/ each holding one folder per class, or the class folders "
        f"themselves ({class_names[:3]}...)."
    )


def bin_examples(
    bin_dir: Path,
    class_names: list[str],
    *,
    seed: int = 42,
    ignore: tuple[str, ...] = (),
) -> dict[str, list[Example]]:
    """The images of one bin by split, labels indexing `class_names`."""
    if not bin_dir.is_dir():
        raise LayoutError(
            f"bin folder {bin_dir} does not exist. Put each bin of the data set in its "
            "own folder under the manual directory (see docs/data.md)."
        )
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_DIRS}
    if detect_layout(bin_dir, class_names) == "split":
        for split, folder in SPLIT_DIRS.items():
            for label, class_dir in enumerate(
                _class_dirs(bin_dir / folder, class_names, ignore).values()
            ):
                splits[split] += [Example(p, label) for p in list_images(class_dir)]
    else:
        for label, class_dir in enumerate(
            _class_dirs(bin_dir, class_names, ignore).values()
        ):
            files = list_images(class_dir)
            rng = np.random.default_rng([seed, label])
            for split, idx in split_indices(len(files), rng).items():
                splits[split] += [Example(files[i], label) for i in sorted(idx)]
    if not any(splits.values()):
        raise LayoutError(
            f"{bin_dir}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files "
            "inside the class folders)."
        )
    return splits
