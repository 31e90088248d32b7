"""Checks the embedded data set's design: source x domain accuracy on digits_drift.

A small CNN is pretrained on the clean pool, then one copy is fine-tuned on each domain
(as GRASP's sources are) and every copy is evaluated on every domain's test split. The
drift is right when each source does well on its own domain (>= 85%) and worse on far
ones. A measurement script, not the training library: AdamW, fixed epochs, no schedule.

    python benchmarks/digits_drift_matrix.py [--data_dir DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow_datasets as tfds

from data.build import build
from data.digits_drift import DOMAINS
from grasp_jax.input_pipeline import PipelineConfig, normalize


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(128, (3, 3))(x)).mean(axis=(1, 2))
        return nn.Dense(10)(x)


def arrays(data_dir: str, config: str, split: str):
    source = tfds.data_source(f"digits_drift/{config}", data_dir=data_dir)[split]
    images = np.stack([ex["image"] for ex in source])
    labels = np.array([ex["label"] for ex in source], np.int32)
    return normalize(jnp.asarray(images), PipelineConfig()), jnp.asarray(labels)


def train(params, images, labels, *, epochs: int, lr: float, seed: int, batch: int = 32):
    model, opt = SmallCNN(), optax.adamw(lr, weight_decay=0.01)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = opt.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            params, opt_state = step(params, opt_state, images[idx], labels[idx])
    return params


def accuracy(params, images, labels) -> float:
    logits = SmallCNN().apply({"params": params}, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/tmp/grasp_jax_tfds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain_epochs", type=int, default=40)
    parser.add_argument("--finetune_epochs", type=int, default=30)
    parser.add_argument("--finetune_lr", type=float, default=1e-3)
    args = parser.parse_args()
    start = time.perf_counter()
    build("digits_drift", data_dir=args.data_dir)
    test = {d: arrays(args.data_dir, d, "test") for d in DOMAINS}
    x, y = arrays(args.data_dir, "pretrain", "train")
    params = SmallCNN().init(jax.random.key(args.seed), x[:1])["params"]
    pretrained = train(params, x, y, epochs=args.pretrain_epochs, lr=1e-3, seed=args.seed)
    zero_shot = "  ".join(f"{d} {accuracy(pretrained, *test[d]):.2f}" for d in DOMAINS)
    print(f"pretrained on the pool, zero-shot: {zero_shot}")
    print(
        "\nsource (fine-tuned on) \\ test domain  " + "  ".join(f"{d:>5}" for d in DOMAINS)
    )
    for source in DOMAINS:
        x, y = arrays(args.data_dir, source, "train")
        tuned = train(
            pretrained,
            x,
            y,
            epochs=args.finetune_epochs,
            lr=args.finetune_lr,
            seed=args.seed,
        )
        row = "  ".join(f"{accuracy(tuned, *test[d]):5.2f}" for d in DOMAINS)
        print(f"{source:<38} {row}")
    print(f"\n{time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    main()
