"""Benchmark: peak memory against the number of sources K, per method.

Each point is a fresh process; its figure is that process's peak resident memory
(VmHWM) at its end. The methods:
- `grasp`: ours; the K source checkpoints are restored one at a time, each when its
  stage starts;
- `grasp_torch`: the reference's GRASP in PyTorch (docs/reference.md §4): each source's
  state dict loaded at its stage into a fresh model, a fresh AdamW per stage, a deep
  copy of the best validation state;
- `ensemble`: ours; the sources' logits summed one source at a time
  (`experiments/methods/ensembles.py`);
- `ensemble_held`: the reference's ENSEMBLE (docs/reference.md §5): all K models loaded,
  then evaluated on validation and test;
- `fusion`: FUSION, the K models trained jointly through their mean logits (one epoch);
- `ties`: the K sources merged by the streaming two-pass TIES (the weight-space merges'
  worst case).

Default: ResNet-50 with a 30-class head, batch 32, 64x64 images (digits_drift
upsampled; the first 64 training and 32 validation and test images: this measures
memory, not accuracy), one epoch per stage. `--model small_cnn` is a wide small CNN
(5.9M parameters) at 32x32 on the whole split.

    python benchmarks/grasp_memory.py [--ks 2 4 8 16] [--model resnet50] [--json F]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("grasp", "grasp_torch", "ensemble", "ensemble_held", "fusion", "ties")
HOLDING = ("ensemble_held", "fusion")  # memory grows with K by design
SETUPS = {  # model: (classes, image size, model keywords, split slices)
    "resnet50": (30, 64, {}, {"train": "[:64]", "validation": "[:32]", "test": "[:32]"}),
    "small_cnn": (10, 32, {"widths": (256, 512, 1024)}, {}),
}
BATCH = 32
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ and data/ run from the checkout


def has_torch_side(model_name: str) -> bool:
    """Whether the PyTorch side can build `model_name` (the zoo's HF architectures)."""
    from grasp_jax.torch_models import HF_CONFIGS

    return model_name in HF_CONFIGS


def jax_child(mode: str, k: int, model_name: str, ckpt_dir: str, data_dir: str) -> None:
    import jax
    import tensorflow_datasets as tfds

    from grasp_jax import checkpoints, evaluation, grasp, models
    from grasp_jax import input_pipeline as ip

    classes, size, keywords, slices = SETUPS[model_name]
    model = models.create(model_name, classes, **keywords)
    abstract = jax.eval_shape(
        lambda: models.init(
            model_name, classes, jax.random.PRNGKey(0), (1, size, size, 3), **keywords
        )
    )

    def loader(i):
        return lambda: checkpoints.restore_variables(Path(ckpt_dir) / f"s{i}", abstract)

    splits = {
        split: tfds.data_source(
            "digits_drift/d0", split=split + slices.get(split, ""), data_dir=data_dir
        )
        for split in ("train", "validation", "test")
    }
    pipeline = ip.PipelineConfig(resize_size=size, crop_size=size, batch_size=BATCH)
    if mode == "fusion":
        from grasp_jax import logit_average, loop, recipe

        stacked = logit_average.stack([loader(i) for i in range(k)])
        train = recipe.TrainConfig(
            epochs=1, head_lr_multiplier=1.0, grad_clip_norm=None, augment=False
        )
        loop.fit(
            logit_average.LogitAverage(model),
            stacked,
            splits["train"],
            splits["validation"],
            config=train,
            pipeline=pipeline,
            progress=False,
        )
    elif mode == "ties":
        from grasp_jax import merging

        base = loader(0)()["params"]
        params = [lambda i=i: loader(i)()["params"] for i in range(k)]
        jax.block_until_ready(
            merging.merge_streaming(merging.streaming.ties(), base, params)
        )
    elif mode in ("ensemble", "ensemble_held"):
        held = [loader(i)() for i in range(k)] if mode == "ensemble_held" else None
        for i in range(k):
            variables = held[i] if held else loader(i)()
            for split in ("validation", "test"):
                evaluation.predict(model, variables, splits[split], pipeline)
            del variables
    else:  # grasp: each source restored when its stage starts
        config = grasp.GraspConfig(initial_epochs=1, finetune_epochs=1, augment=False)
        steps = grasp.default_steps(
            model,
            splits,
            config=config,
            pipeline=pipeline,
            progress=False,
            validate_merges=False,
        )
        sources = [(f"s{i}", loader(i)) for i in range(1, k)]
        grasp.run_grasp(loader(0)(), sources, steps, config=config, key=jax.random.key(0))


def torch_child(k: int, model_name: str, ckpt_dir: str) -> None:
    """The reference's GRASP loop in PyTorch on random images of the same shapes."""
    import safetensors.torch
    import torch

    from grasp_jax.torch_models import hf_model

    classes, size, _, _ = SETUPS[model_name]
    generator = torch.Generator().manual_seed(0)

    def images(count):
        x = torch.randn(count, 3, size, size, generator=generator)
        y = torch.randint(0, classes, (count,), generator=generator)
        return list(zip(x.split(BATCH), y.split(BATCH), strict=True))

    train, validation = images(64), images(32)

    def load(i):
        model = hf_model(model_name, classes)
        state = safetensors.torch.load_file(Path(ckpt_dir) / f"s{i}.safetensors")
        model.load_state_dict(state)
        return model

    def gradients(model, batch):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(batch[0]).logits, batch[1])
        loss.backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def fine_tune(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
        model.train()
        for x, y in train:
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x).logits, y).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            for x, _ in validation:
                model(x)
        model.load_state_dict(copy.deepcopy(model.state_dict()))  # the best-state copy

    current = load(0)
    fine_tune(current)
    for i in range(1, k):
        source = load(i)
        source.eval()
        current.train()
        g_src, g_cur = gradients(source, train[0]), gradients(current, train[0])
        state, source_state = current.state_dict(), source.state_dict()
        for name, a in g_cur.items():
            b = g_src[name]
            score = (a.flatten() @ b.flatten()) / (a.norm() * b.norm() + 1e-8)
            if score.item() > 0.3:
                state[name] = source_state[name].clone()
        current.load_state_dict(state)
        del source, source_state, g_src, g_cur
        fine_tune(current)


def make_sources(model_name: str, count: int, ckpt_dir: Path) -> int:
    """`count` distinct source checkpoints for each side; the parameter count."""
    import jax
    import safetensors.torch
    import torch

    from grasp_jax import checkpoints, models
    from grasp_jax.torch_models import hf_model

    classes, size, keywords, _ = SETUPS[model_name]
    base = models.init(
        model_name, classes, jax.random.PRNGKey(0), (1, size, size, 3), **keywords
    )
    for i in range(count):
        noisy = jax.tree.map(lambda x, i=i: x * (1 + 0.01 * i), base)
        checkpoints.save_variables(ckpt_dir / f"s{i}", noisy, {})
    if has_torch_side(model_name):
        torch.manual_seed(0)
        state = hf_model(model_name, classes).state_dict()
        for i in range(count):
            noisy = {n: (t * (1 + 0.01 * i)).contiguous() for n, t in state.items()}
            safetensors.torch.save_file(noisy, ckpt_dir / f"s{i}.safetensors")
    return sum(x.size for x in jax.tree.leaves(base["params"]))


def crossing(ks: list[int], grasp: list[float], other: list[float]) -> str:
    """The K at which `other` first rises above `grasp`, interpolated linearly in K
    between measured points."""
    pairs = [(k, g, o) for k, g, o in zip(ks, grasp, other, strict=True) if o == o]
    for (k0, g0, o0), (k1, g1, o1) in itertools.pairwise(pairs):
        if o0 <= g0 and o1 > g1:
            return f"K = {k0 + (k1 - k0) * (g0 - o0) / ((o1 - g1) - (o0 - g0)):.1f}"
    if pairs and pairs[0][2] > pairs[0][1]:
        return f"already above at K = {pairs[0][0]}"
    return "not within the measured K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--model", choices=sorted(SETUPS), default="resnet50")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--data_dir", default="/tmp/grasp_jax_tfds")
    parser.add_argument(
        "--max_k_holding",
        type=int,
        default=16,
        help="largest K for the modes that hold all K models (memory grows with K)",
    )
    parser.add_argument("--json", help="also write the table here as JSON")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, k, ckpt_dir = args.child
        if mode == "grasp_torch":
            torch_child(int(k), args.model, ckpt_dir)
        else:
            jax_child(mode, int(k), args.model, ckpt_dir, args.data_dir)
        from grasp_jax import memory

        print(json.dumps({"peak_mb": memory.peak_host_memory_bytes() / 2**20}))
        return

    from data.build import build

    build("digits_drift", data_dir=args.data_dir, configs=["d0"])
    modes = [m for m in MODES if m in args.modes]
    if not has_torch_side(args.model) and "grasp_torch" in modes:
        modes.remove("grasp_torch")
    with tempfile.TemporaryDirectory() as ckpt_dir:
        n_params = make_sources(args.model, max(args.ks), Path(ckpt_dir))
        classes, size, _, _ = SETUPS[args.model]
        print(
            f"model: {args.model}, {n_params:,} parameters ({n_params * 4 / 2**20:.1f} MiB "
            f"per copy), {classes} classes, batch {BATCH}, {size}x{size}"
        )
        print("peak MiB per method (VmHWM of a fresh process per point)")
        print(f"{'K':>3}" + "".join(f"{m:>14}" for m in modes))
        table = {"model": args.model, "modes": modes, "parameters": n_params, "rows": {}}
        for k in args.ks:
            peaks = []
            for mode in modes:
                if mode in HOLDING and k > args.max_k_holding:
                    peaks.append(float("nan"))
                    continue
                command = [sys.executable, __file__, "--model", args.model]
                command += ["--data_dir", args.data_dir, "--child", mode, str(k), ckpt_dir]
                out = subprocess.run(command, capture_output=True, text=True, check=False)
                if out.returncode != 0:
                    raise RuntimeError(f"{mode} at K={k} failed:\n{out.stderr[-3000:]}")
                peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])
            print(f"{k:>3}" + "".join(f"{p:>14.0f}" for p in peaks), flush=True)
            table["rows"][k] = peaks
    ks = list(table["rows"])
    column = {m: [table["rows"][k][i] for k in ks] for i, m in enumerate(modes)}
    for mode in modes:
        first, last = column[mode][0], column[mode][-1]
        if len(ks) > 1 and not math.isnan(last):
            print(f"{mode}: K={ks[-1]} / K={ks[0]} = {last / first:.2f}")
    for mode in modes if "grasp" in modes else []:
        if mode != "grasp":
            above = crossing(ks, column["grasp"], column[mode])
            print(f"{mode} rises above grasp: {above}")
    if args.json:
        Path(args.json).write_text(json.dumps(table))


if __name__ == "__main__":
    main()
