"""GRASP's final model saved where the reference saves it: its raw PyTorch state dict in
`checkpoints/<run folder without _trial<k>>_final.ckpt` beside the run folder
(`torch.load(path, weights_only=True)` reads it)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from grasp_jax import files, interop


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
