"""Every finished run is in TensorBoard under `<target>/<method>/trial<k>/...`."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from experiments.report import tensorboard

ROOT = Path(__file__).resolve().parents[1]


def read_events(folder) -> dict[str, list[tuple[int, float | str]]]:
    """tag -> [(step, value)] of every event file in `folder` (TFRecord framing:
    length, its CRC, the serialised Event, its CRC)."""
    found: dict[str, list] = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                kind = "histo" if value.HasField("histo") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, kind))
    return found


RECORD = {
    "target": "d2",
    "trial": 3,
    "history": [
        {"epoch": 0, "train_loss": 2.5, "val_accuracy": 0.5, "stage": 0},
        {"epoch": 0, "train_loss": 1.5, "val_accuracy": 0.75, "stage": 1},
    ],
    "transfer_history": [
        {
            "source": "d0",
            "fraction": 0.25,
            "val_accuracy_before_merge": 0.5,
            "val_accuracy_after_merge": 0.625,
            "val_accuracy_after_finetune": 0.75,
            "fraction_by_layer": {"conv/kernel": 0.0, "head/bias": 1.0},
        }
    ],
    "val_metrics": {"accuracy": 0.75},
    "test_metrics": {"accuracy": 0.875},
}


def test_a_runs_curves_and_merges_are_tagged_by_target_method_and_trial(tmp_path):
    tensorboard.log_run(tmp_path, RECORD, "grasp_30")
    events = read_events(tmp_path)
    prefix = "d2/grasp_30/trial3"
    assert events[f"{prefix}/epoch/train_loss"] == [(0, 2.5), (1, 1.5)]
    assert events[f"{prefix}/epoch/stage"] == [(0, 0.0), (1, 1.0)]
    assert events[f"{prefix}/merge/fraction"] == [(1, 0.25)]
    assert events[f"{prefix}/merge/val_accuracy_after_merge"] == [(1, 0.625)]
    assert events[f"{prefix}/merge/fraction_by_layer"] == [(1, "histo")]
    assert events[f"{prefix}/test_accuracy"] == [(0, 0.875)]
    assert f"{prefix}/epoch/val_loss" not in events  # not in the record: not invented


@pytest.mark.parametrize("missing", ["history", "transfer_history", "test_metrics"])
def test_a_record_without_a_part_is_logged_without_it(tmp_path, missing):
    record = {k: v for k, v in RECORD.items() if k != missing}
    tensorboard.log_run(tmp_path, record, "ensemble")
    assert read_events(tmp_path)["d2/ensemble/trial3/val_accuracy"] == [(0, 0.75)]


def test_runs_logged_within_one_second_keep_their_own_events(tmp_path):
    """Event files are named by the second: a run logged right after another once
    replaced its file."""
    for trial in (1, 2, 3):
        tensorboard.log_run(tmp_path, RECORD | {"trial": trial}, "finetune")
    events = read_events(tmp_path)
    for trial in (1, 2, 3):
        assert events[f"d2/finetune/trial{trial}/test_accuracy"] == [(0, 0.875)]


def test_writing_events_leaves_pytorch_unimported_and_importable(tmp_path):
    """tensorboardX imports PyTorch (~1 s) when it is installed; a run that writes
    events with our writer does not pay for it, and can still import PyTorch after."""
    script = (
        "import sys; from experiments.report import tensorboard;"
        f"tensorboard.log_run(__import__('pathlib').Path({str(tmp_path)!r}), "
        f"{RECORD!r}, 'grasp');"
        "print('torch' in sys.modules); import torch; print(torch.ones(2).sum().item())"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "2.0"]
    assert "d2/grasp/trial3/merge/fraction" in read_events(tmp_path)
