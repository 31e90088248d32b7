"""A run's final model, kept: with `config.save_models` every single-model method's as our
Orbax checkpoint in `<run folder>/model/` (and `model.safetensors` in the PyTorch layout
with `config.save_models_safetensors`); with `config.save_final` GRASP's where the
reference saves it, its raw PyTorch state dict in `checkpoints/<run folder without
_trial<k>>_final.ckpt` (`torch.load(path, weights_only=True)` reads it)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from grasp_jax import checkpoints, files, interop

MODEL_FOLDER = "model"


def path_of(out_dir: Path) -> Path:
    return out_dir / "checkpoints" / f"{out_dir.name.rsplit('_trial', 1)[0]}_final.ckpt"


def save_pytorch(config, out_dir: Path, variables) -> Path:
    """Writes `variables` of `config.model` in the model's PyTorch layout (process 0)."""
    import torch

    path = path_of(out_dir)
    state = {
        k: torch.from_numpy(np.array(v))
        for k, v in interop.export_numpy(config.model, variables).items()
    }
    if jax.process_index() == 0:
        files.write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def save_run_model(config, out_dir: Path, variables) -> Path:
    """`variables` as `<out_dir>/model/` (Orbax; `experiments.evaluate` reads it), and
    as `<out_dir>/model.safetensors` if asked."""
    metadata = {
        "model": config.model,
        "num_classes": config.num_classes,
        "model_overrides": config.model_overrides.to_dict(),
        "run": out_dir.name,
    }
    path = checkpoints.save_variables(out_dir / MODEL_FOLDER, variables, metadata)
    if config.save_models_safetensors and jax.process_index() == 0:
        interop.save_safetensors(out_dir / "model.safetensors", config.model, variables)
    return path
