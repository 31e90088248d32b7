"""Every finished run in TensorBoard: `tensorboard --logdir <workdir>/tensorboard`.

Written from the run's record when it finishes, so every method is logged the same way
(live curves while training exist for the sources only). Tags are
`<target>/<method><folder suffix>/trial<k>/...`: per epoch the training and validation
curves and the stage; for GRASP per merge the share moved, validation accuracy before
and after the merge and after fine-tuning, and the per-layer shares as a histogram.
"""

from __future__ import annotations

import sys
from pathlib import Path

EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")
MERGE_KEYS = (
    "fraction",
    "val_accuracy_before_merge",
    "val_accuracy_after_merge",
    "val_accuracy_after_finetune",
)


def summary_writer(folder: Path, **kwargs):
    """tensorboardX's `SummaryWriter` for `folder`. tensorboardX imports PyTorch when it
    is installed (~1 s a process) only to recognise its tensors among the values it is
    given; we give it numbers and NumPy arrays, so a process that has not imported
    PyTorch imports tensorboardX with PyTorch hidden (`import torch` then fails, which
    tensorboardX expects), and PyTorch stays importable afterwards."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(folder), **kwargs)


def log_run(folder: Path, record: dict, label: str) -> None:
    """Writes `record` (a run's metrics.json) under `folder` with tags
    `<target>/<label>/trial<k>/...`."""
    prefix = f"{record['target']}/{label}/trial{record['trial']}"
    # Event files are named by the second and the host: runs finishing within one
    # second would overwrite each other's file without a suffix of their own.
    suffix = f".{record['target']}.{label}.trial{record['trial']}"
    with summary_writer(folder, filename_suffix=suffix) as writer:
        for step, epoch in enumerate(record.get("history", [])):
            for key in (*EPOCH_KEYS, "stage"):
                if isinstance(epoch.get(key), int | float):
                    writer.add_scalar(f"{prefix}/epoch/{key}", epoch[key], step)
        for stage, merge in enumerate(record.get("transfer_history", []), start=1):
            for key in MERGE_KEYS:
                if isinstance(merge.get(key), int | float):
                    writer.add_scalar(f"{prefix}/merge/{key}", merge[key], stage)
            by_layer = list(merge.get("fraction_by_layer", {}).values())
            if by_layer:
                writer.add_histogram(f"{prefix}/merge/fraction_by_layer", by_layer, stage)
        for split in ("val", "test"):
            accuracy = record.get(f"{split}_metrics", {}).get("accuracy")
            if isinstance(accuracy, int | float):
                writer.add_scalar(f"{prefix}/{split}_accuracy", accuracy, 0)
