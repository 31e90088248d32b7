"""`experiments.compare` on a results tree shaped as the reference writes it
(docs/reference.md §6) and one shaped as ours: matched runs, statistics by hand,
missing cells."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import compare
from experiments.settings import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, name: str, record: dict) -> None:
    path = root / "results" / "clear10" / name / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def reference_record(target, trial, accuracy, f1, minutes=2.0):
    """The reference's keys: HF id as `model`, no seed, `alignment_threshold`."""
    return {
        "dataset": "clear10",
        "target": target,
        "sources": ["year_5-6"],
        "trial": trial,
        "model": "apple/mobilevit-xx-small",
        "method": "grasp",
        "val_metrics": {"accuracy": 0.5},
        "test_metrics": {"accuracy": accuracy, "f1_score": f1, "auroc": 0.9},
        "total_time_seconds": 60 * minutes,
        "total_time_minutes": minutes,
        "gpu_memory": {"peak_gpu_memory_gb": 3.0},
        "hyperparameters": {"alignment_threshold": 0.3, "batch_size": 32},
        "transfer_history": [{"source": "year_5-6", "n_transferred": 10}],
    }


def our_record(target, trial, accuracy, f1):
    record = reference_record(target, trial, accuracy, f1, minutes=1.0)
    return record | {
        "model": "mobilevit-xxs",
        "zoo_model": "mobilevit_xxs",
        "gpu_memory": {"peak_gpu_memory_gb": 1.0},
    }


# (side, target, trial, test accuracy, F1): year_3-4 only in the reference, year_5-6 only
# in ours, year_1-2 in both with 2 and 3 trials.
RUNS = [
    ("reference", "year_1-2", 1, 0.80, 0.70),
    ("reference", "year_1-2", 2, 0.90, 0.80),
    ("reference", "year_3-4", 1, 0.60, 0.50),
    ("ours", "year_1-2", 1, 0.85, 0.75),
    ("ours", "year_1-2", 2, 0.85, 0.85),
    ("ours", "year_1-2", 3, 0.70, 0.60),
    ("ours", "year_5-6", 1, 0.50, 0.40),
]


@pytest.fixture
def trees(tmp_path):
    make = {"reference": reference_record, "ours": our_record}
    for side, target, trial, accuracy, f1 in RUNS:
        write_run(
            tmp_path / side,
            f"mobilevit-xxs_{target}_grasp_30_trial{trial}",
            make[side](target, trial, accuracy, f1),
        )
    return tmp_path / "reference", tmp_path / "ours"


def test_runs_are_matched_and_missing_sides_stay_missing(trees):
    reference, ours = trees
    rows = compare.compare(compare.read_runs(ours), compare.read_runs(reference))
    assert [r["target"] for r in rows] == ["year_1-2", "year_3-4", "year_5-6"]
    both, only_reference, only_ours = rows
    assert both["model"] == "mobilevit_xxs" and both["method"] == "grasp (threshold 0.3)"
    assert (both["ours_trials"], both["reference_trials"]) == (3, 2)
    assert both["ours_accuracy_mean"] == pytest.approx(0.8)  # (85 + 85 + 70) / 3
    assert both["ours_accuracy_std"] == pytest.approx((0.015 / 3) ** 0.5)
    assert both["reference_accuracy_mean"] == pytest.approx(0.85)
    assert both["reference_accuracy_std"] == pytest.approx(0.05)  # population std
    assert both["accuracy_difference_points"] == pytest.approx(-5.0)
    assert both["reference_minutes"] == 2.0 and both["ours_peak_gb"] == 1.0
    assert (
        only_reference["ours_trials"] == 0 and only_reference["ours_accuracy_mean"] is None
    )
    assert only_reference["accuracy_difference_points"] is None
    assert only_ours["reference_trials"] == 0
    text = compare.markdown(rows)
    assert (
        "| clear10 | mobilevit_xxs | grasp (threshold 0.3) | year_1-2 | 80.0 ± 7.1 (3) "
        "| 85.0 ± 5.0 (2) | -5.0 | 73.3 ± 10.3 (3) | 75.0 ± 5.0 (2) | 90.0 ± 0.0 (3) "
        "| 90.0 ± 0.0 (2) | 1.00 / 2.00 | 1.00 / 3.00 |"
    ) in text
    assert "| year_3-4 | missing | 60.0 ± 0.0 (1) | missing |" in text
    assert "| year_5-6 | 50.0 ± 0.0 (1) | missing | missing |" in text
    assert " 0.0 (0)" not in text  # a missing side is never a zero


def test_the_command_writes_markdown_csv_and_png_without_torch(trees, tmp_path):
    reference, ours = trees
    out = tmp_path / "comparison.md"
    script = (
        "import sys; from absl import app; from experiments import compare\n"
        "compare.define_flags()\n"
        "try:\n    app.run(compare.main)\n"
        "except SystemExit:\n    print('torch' in sys.modules)"
    )
    flags = [f"--reference={reference}", f"--ours={ours}", f"--out={out}"]
    result = subprocess.run(
        [sys.executable, "-c", script, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("False")  # torch never imported
    assert out.read_text() in result.stdout
    with out.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["target"] for r in table] == ["year_1-2", "year_3-4", "year_5-6"]
    assert table[1]["ours_accuracy_mean"] == "" and table[2]["reference_trials"] == "0"
    assert out.with_suffix(".png").stat().st_size > 0


def test_a_folder_without_runs_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no <dataset>/<run>/metrics\.json"):
        compare.read_runs(tmp_path)


def test_grasp_variants_are_rows_of_their_own_and_collisions_are_named(tmp_path, caplog):
    """Runs were keyed by method and threshold only: a channel/soft run at the same
    threshold silently replaced the tensor/hard one. A NaN accuracy is reported."""
    root = tmp_path / "ours"
    hard = our_record("year_1-2", 1, 0.8, 0.7)
    soft = our_record("year_1-2", 1, 0.6, 0.5)
    soft["hyperparameters"] |= {"granularity": "channel", "mode": "soft"}
    write_run(root, "mobilevit-xxs_year_1-2_grasp_30_trial1", hard)
    write_run(root, "mobilevit-xxs_year_1-2_grasp_30_channel_soft_trial1", soft)
    runs = compare.read_runs(root)
    assert sorted(key[2] for key in runs) == [
        "grasp (threshold 0.3)",
        "grasp (threshold 0.3, channel soft)",
    ]
    write_run(root, "copy_of_the_hard_run", hard)
    with pytest.raises(ConfigError, match=r"copy_of_the_hard_run and .* same run"):
        compare.read_runs(root)
    (root / "results/clear10/copy_of_the_hard_run/metrics.json").unlink()
    nan = our_record("year_3-4", 1, float("nan"), 0.5)
    write_run(root, "mobilevit-xxs_year_3-4_grasp_30_trial1", nan)
    compare.read_runs(root)
    assert "test accuracy is nan" in caplog.text


def test_the_table_is_the_header_and_one_line_per_row():
    """The whole text for one ensemble run per side, written by hand: a method without
    threshold or hyperparameters is its bare name."""
    record = reference_record("year_1-2", 1, 0.75, 0.5) | {"method": "ensemble"}
    del record["hyperparameters"]
    ours = {compare.run_key(record): record}
    reference = {compare.run_key(record): record}
    assert compare.markdown(compare.compare(ours, reference)) == (
        "Test metrics in %, mean ± population std over trials (n); Δ: ours minus the "
        "reference, in points; time in minutes, peak memory in GiB.\n"
        "\n"
        "| dataset | model | method | target | accuracy ours | accuracy reference | Δ "
        "| F1 ours | F1 reference | AUROC ours | AUROC reference | minutes ours / ref "
        "| peak GB ours / ref |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| clear10 | mobilevit_xxs | ensemble | year_1-2 | 75.0 ± 0.0 (1) "
        "| 75.0 ± 0.0 (1) | +0.0 | 50.0 ± 0.0 (1) | 50.0 ± 0.0 (1) | 90.0 ± 0.0 (1) "
        "| 90.0 ± 0.0 (1) | 2.00 / 2.00 | 3.00 / 3.00 |\n"
    )


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "JSONDecodeError"),
        ("[0.8]", "TypeError"),
        ('{"dataset": "clear10"}', "KeyError"),
        (json.dumps(our_record("year_1-2", "first", 0.8, 0.7)), "ValueError"),
        (json.dumps(our_record("year_1-2", 1, "high", 0.7)), "ValueError"),
    ],
)
def test_a_file_that_is_no_runs_metrics_is_named_with_why(tmp_path, content, why):
    path = tmp_path / "results" / "clear10" / "run" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(ConfigError) as raised:
        compare.read_runs(tmp_path)
    assert str(raised.value).startswith(f"{path} is not a run's metrics.json ({why}(")


def test_the_results_folder_or_the_folder_holding_it_and_nothing_else(trees):
    _, ours = trees
    assert compare.read_runs(ours / "results") == compare.read_runs(ours)
    for missing in (ours / "nowhere", next(ours.glob("results/*/*/metrics.json"))):
        with pytest.raises(ConfigError, match="is not a folder of results"):
            compare.read_runs(missing)


def test_metrics_a_run_lacks_are_left_out_of_its_means_not_counted_as_zero(tmp_path):
    root = tmp_path / "ours"
    records = [our_record("year_1-2", trial, 0.6 + 0.1 * trial, 0.5) for trial in (1, 2, 3)]
    del records[1]["test_metrics"]["f1_score"], records[1]["gpu_memory"]
    del records[2]["total_time_minutes"]
    records[0]["total_time_minutes"] = 4.0
    records[2]["test_metrics"]["f1_score"] = 0.8
    for record in records:
        write_run(root, f"mobilevit-xxs_year_1-2_grasp_30_trial{record['trial']}", record)
    (row,) = compare.compare(compare.read_runs(root), {})
    assert row["ours_trials"] == 3 and row["reference_trials"] == 0
    assert row["ours_accuracy_mean"] == pytest.approx(0.8)  # 0.7, 0.8, 0.9
    assert row["ours_f1_score_mean"] == pytest.approx(0.65)  # 0.5 and 0.8; trial 2 has none
    assert row["ours_f1_score_std"] == pytest.approx(0.15)
    assert row["ours_minutes"] == pytest.approx(2.5)  # 4 and 1; trial 3 has none
    assert row["ours_peak_gb"] == pytest.approx(1.0)
    assert row["reference_accuracy_mean"] is None and row["reference_minutes"] is None
    assert row["accuracy_difference_points"] is None
