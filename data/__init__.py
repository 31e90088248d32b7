"""TFDS builders for GRASP's data sets; importing this package registers them all.

`clear10`, `clear100` (the reference's 30 classes) and `yearbook` read a manual directory
in the reference's layout; `digits_drift` is built offline from scikit-learn's digits.
Build with `python -m data.build NAME [--manual_dir DIR]`, read with `tfds.data_source`.
"""

from data import clear10, clear100, digits_drift, yearbook

__all__ = ["clear10", "clear100", "digits_drift", "yearbook"]
