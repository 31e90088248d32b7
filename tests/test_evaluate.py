"""`experiments.evaluate` on a Lightning checkpoint shaped as the reference saves it: the
same predictions as the PyTorch model makes on the same preprocessed images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments import evaluate, settings, sources
from experiments.configs import digits
from grasp_jax import evaluation, torch_models
from grasp_jax import input_pipeline as ip
from tests.trees import random_variables

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """A random MobileViT-XXS with 10 classes, saved as the reference's `.ckpt`."""
    model = torch_models.randomize(torch_models.hf_model("mobilevit_xxs", 10), seed=4)
    model.eval()
    path = tmp_path_factory.mktemp("ckpt") / "mobilevit-xxs_d1-best-acc-epoch-02.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 2, "state_dict": state, "hyper_parameters": {}}, path)
    return model, path


def mobilevit_config(digits_dir):
    config = digits.get_config("model=mobilevit_xxs,pipeline.resize_size=64")
    config.pipeline.crop_size = 64
    config.data_dir = str(digits_dir)
    return config


def test_predictions_equal_the_pytorch_models(digits_dir, tmp_path, lightning):
    model, path = lightning
    config = mobilevit_config(digits_dir)
    settings.check(config)
    result = evaluate.evaluate_checkpoint(config, path, "d1", tmp_path)
    test = sources.load_splits(config, tmp_path, "d1")["test"]
    pipeline = settings.pipeline(config)
    torch_logits, labels = [], []
    for batch in ip.dataset(test, pipeline, train=False):
        images = (
            np.array(ip.normalize(batch["image"], pipeline)).transpose(0, 3, 1, 2).copy()
        )
        with torch.no_grad():
            torch_logits.append(model(torch.from_numpy(images)).logits.numpy())
        labels.append(batch["label"])
    torch_logits, labels = np.concatenate(torch_logits), np.concatenate(labels)
    ours = evaluation.predict(
        sources.model_and_abstract(config)[0],
        evaluate.load_variables(config, path),
        test,
        pipeline,
    )
    np.testing.assert_array_equal(ours["labels"], labels)
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # not a near-tie
    assert clear.sum() >= 0.98 * len(labels)
    np.testing.assert_array_equal(
        ours["logits"].argmax(1)[clear], torch_logits.argmax(1)[clear]
    )
    accuracy = float(np.mean(torch_logits.argmax(1) == labels))
    assert result["test_metrics"]["accuracy"] == pytest.approx(accuracy, abs=2 / 450)
    assert set(result["val_metrics"]) >= {"accuracy", "precision", "f1_score", "auroc"}
    assert result["model"] == "mobilevit-xxs" and result["target"] == "d1"


def test_the_command_writes_the_reference_keys(digits_dir, tmp_path, lightning):
    _, path = lightning
    out = tmp_path / "metrics.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            f"--checkpoint={path}",
            "--config=digits:model=mobilevit_xxs,pipeline.resize_size=64,"
            "pipeline.crop_size=64",
            f"--config.data_dir={digits_dir}",
            "--bin=d1",
            f"--out={out}",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test_metrics: accuracy" in result.stdout
    assert out.is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--checkpoint={tmp_path}/none"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().endswith("none does not exist")


def test_save_final_writes_the_reference_state_dict_that_evaluate_reads(tmp_path):
    """GRASP's final model, as the reference saves it (`checkpoints/<run>_final.ckpt`, a
    raw state dict without `model.`), read back by PyTorch and by `evaluate`."""
    import types

    import jax

    from experiments import final_model

    variables = random_variables("mobilevit_xxs", 10, seed=3)
    run = tmp_path / "mobilevit-xxs_d1_grasp_30_trial2"
    config = types.SimpleNamespace(model="mobilevit_xxs")
    path = final_model.save_pytorch(config, run, variables)
    assert path == run / "checkpoints" / "mobilevit-xxs_d1_grasp_30_final.ckpt"
    state = torch.load(path, weights_only=True)
    assert "classifier.weight" in state and not any(k.startswith("model.") for k in state)
    (run / "metrics.json").write_text("{}")  # a finished run folder
    config = digits.get_config("model=mobilevit_xxs,pipeline.resize_size=64")
    config.pipeline.crop_size = 64
    restored = evaluate.load_variables(config, run)
    jax.tree.map(np.testing.assert_array_equal, restored, variables)


def test_save_models_keeps_each_runs_model_and_evaluate_reads_it(
    digits_dir, small_sources, tmp_path
):
    """With save_models a run folder holds its final model: evaluated again from disk
    it gives the test accuracy the run recorded; methods without one model save none.
    Two trials: their runs, side by side, save at about the same time."""
    from experiments import runner
    from tests.pinned_experiment import small_config, with_sources

    with_sources(small_sources, tmp_path)
    config = small_config(digits_dir, targets="d2", trials=2)
    config.methods = ("finetune", "ensemble")
    config.save_models = True
    assert config.concurrent_runs == 2
    runner.run_experiment(config, tmp_path, progress=False)
    results = tmp_path / "results" / "digits_drift"
    run = results / runner.run_name(config, "d2", "finetune", 1)
    recorded = json.loads((run / "metrics.json").read_text())["test_metrics"]["accuracy"]
    again = evaluate.evaluate_checkpoint(config, run, "d2", tmp_path)
    assert again["test_metrics"]["accuracy"] == recorded
    assert (results / runner.run_name(config, "d2", "finetune", 2) / "model").is_dir()
    assert not (results / runner.run_name(config, "d2", "ensemble", 1) / "model").exists()
    config.save_models_safetensors = True  # small_cnn has no PyTorch layout
    with pytest.raises(settings.ConfigError, match="small_cnn has no PyTorch layout"):
        settings.check(config)
