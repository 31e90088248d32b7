"""Import PyTorch weights (official ImageNet ones, or the reference's checkpoints) into a
grasp-jax checkpoint folder that configs start from (`config.init`).

    python -m experiments.import_weights --model=resnet50 \\
        --weights=resnet50-11ad3fa6.pth --num_classes=30 --out=runs/clear100/init/resnet50

`--weights`: an HF model directory (`save_pretrained` / hub snapshot), a `.safetensors`,
`.bin`, `.pth` or Lightning `.ckpt` file. When `--num_classes` differs from the
checkpoint's head, the head is replaced by a fresh one (ImageNet's 1000 classes -> the
data set's); otherwise it is kept, and a head of another size is an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
from absl import app, flags

from experiments import cli
from grasp_jax import checkpoints, interop


def define_flags() -> None:
    flags.DEFINE_enum("model", None, sorted(interop.LAYOUTS), "Zoo model name.")
    flags.DEFINE_string("weights", None, "PyTorch weights (file or HF directory).")
    flags.DEFINE_integer("num_classes", None, "Classes of the new head.")
    flags.DEFINE_string("out", None, "Checkpoint folder to write.")
    flags.DEFINE_integer("seed", 0, "Seed of a new head's initialisation.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --out.")
    flags.mark_flags_as_required(["model", "weights", "num_classes", "out"])


def import_weights(
    model: str,
    weights: str,
    num_classes: int,
    out: str,
    seed: int = 0,
    *,
    overwrite: bool = False,
):
    """Imports `weights` for `model` with a `num_classes` head and saves them at `out`,
    which must not exist yet unless `overwrite` (a trained source is a folder too)."""
    if Path(out).exists() and not overwrite:
        raise checkpoints.CheckpointError(
            f"--out={out} already exists; choose a new folder, or pass --overwrite to "
            "replace it"
        )
    drop_head = interop.checkpoint_num_classes(model, weights) != num_classes
    variables = interop.import_torch(
        model,
        weights,
        num_classes=num_classes,
        drop_head=drop_head,
        rng=jax.random.key(seed),
    )
    metadata = {
        "model": model,
        "num_classes": num_classes,
        "imported_from": str(Path(weights).absolute()),
        "new_head": drop_head,
    }
    return checkpoints.save_variables(out, variables, metadata), drop_head


def main(argv):
    del argv
    given = flags.FLAGS
    with cli.one_line_errors("experiments.import_weights"):
        path, new_head = import_weights(
            given.model,
            given.weights,
            given.num_classes,
            given.out,
            given.seed,
            overwrite=given.overwrite,
        )
    head = "a new head" if new_head else "the checkpoint's head"
    print(f"wrote {path} ({given.model}, {given.num_classes} classes, {head})")


if __name__ == "__main__":
    cli.exit_on_help(sys.argv, __doc__, define_flags, takes_config=False)
    define_flags()
    app.run(main)
