"""The numbers over runs: means, population stds, and paired differences with Student t
intervals (runs of one (target, trial) share a seed, so methods are compared in pairs)."""

from __future__ import annotations

import numpy as np


def mean_with_interval(differences: list[float]) -> dict:
    """Mean and two-sided 95 % Student t interval of `differences` (e.g. paired, in points);
    the interval is None for fewer than two pairs."""
    from scipy import stats

    n = len(differences)
    mean = float(np.mean(differences)) if n else None
    interval = None
    if n >= 2:
        half = stats.t.ppf(0.975, n - 1) * np.std(differences, ddof=1) / np.sqrt(n)
        interval = [mean - float(half), mean + float(half)]
    return {"mean": mean, "ci95": interval, "n_pairs": n, "interval": "student t"}


def summarize(results: list[dict], baseline: str = "grasp") -> dict:
    """Per method, ranked by mean test accuracy (best first, `rank` 1): test accuracy
    mean/std (population std, as the reference) over all targets and trials, the run
    count, the same per target, and the paired difference
    to `baseline` (method minus baseline, in points, over the (target, trial) pairs both
    ran: they share a seed)."""
    summary: dict = {"methods": {}}
    accuracy = {
        (r["method_label"], r["target"], r["trial"]): r["test_metrics"]["accuracy"]
        for r in results
    }
    for method in sorted({r["method_label"] for r in results}):
        runs = [r for r in results if r["method_label"] == method]
        accs = [r["test_metrics"]["accuracy"] for r in runs]
        per_target = {}
        for target in sorted({r["target"] for r in runs}):
            t_accs = [r["test_metrics"]["accuracy"] for r in runs if r["target"] == target]
            per_target[target] = {
                "test_accuracy_mean": float(np.mean(t_accs)),
                "test_accuracy_std": float(np.std(t_accs)),
                "n_runs": len(t_accs),
            }
        summary["methods"][method] = {
            "test_accuracy_mean": float(np.mean(accs)),
            "test_accuracy_std": float(np.std(accs)),
            "n_runs": len(accs),
            "per_target": per_target,
        }
        pairs = [
            100 * (accuracy[key] - accuracy[(baseline, *key[1:])])
            for key in sorted(k for k in accuracy if k[0] == method)
            if (baseline, *key[1:]) in accuracy
        ]
        if method != baseline and pairs:
            summary["methods"][method][f"paired_difference_to_{baseline}"] = (
                mean_with_interval(pairs)
            )
    ranked = sorted(summary["methods"].items(), key=lambda kv: -kv[1]["test_accuracy_mean"])
    summary["methods"] = {name: dict(m, rank=i + 1) for i, (name, m) in enumerate(ranked)}
    summary["baseline"] = baseline
    return summary
