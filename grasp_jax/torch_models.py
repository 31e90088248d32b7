"""PyTorch twins of the zoo models, built offline, for parity checks and the
benchmarks against PyTorch (needs the torch extra: `pip install -e '.[torch]'`).

HF transformers models are built from their configs (the hub configs' architecture
fields, written out here: no network); the torchvision-layout ResNet-50 is written by
hand (torchvision itself is not installed) with the reference's `Dropout -> Linear` head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HF_CONFIGS = {
    "mobilevit_xxs": (
        "MobileViT",
        {
            "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320],
            "hidden_sizes": [64, 80, 96],
            "expand_ratio": 2.0,
        },
    ),
    "mobilevit_xs": (
        "MobileViT",
        {
            "neck_hidden_sizes": [16, 32, 48, 64, 80, 96, 384],
            "hidden_sizes": [96, 120, 144],
            "expand_ratio": 4.0,
        },
    ),
    "efficientnet_b1": (
        "EfficientNet",
        {
            "width_coefficient": 1.0,
            "depth_coefficient": 1.1,
            "image_size": 240,
            "dropout_rate": 0.2,
            "depthwise_padding": [16],
            "hidden_dim": 1280,
        },
    ),
    "resnet50": ("ResNet", {}),
}
NO_DROPOUT = {  # HF config fields that switch every dropout off (train-mode parity)
    "MobileViT": {"hidden_dropout_prob": 0.0, "classifier_dropout_prob": 0.0},
    "EfficientNet": {"dropout_rate": 0.0, "drop_connect_rate": 0.0},
    "ResNet": {},
}
FLAX_NO_DROPOUT = {
    "mobilevit_xxs": {"hidden_dropout_prob": 0.0, "classifier_dropout_prob": 0.0},
    "mobilevit_xs": {"hidden_dropout_prob": 0.0, "classifier_dropout_prob": 0.0},
    "efficientnet_b1": {"dropout_rate": 0.0, "drop_connect_rate": 0.0},
    "resnet50": {"dropout_rate": 0.0},
}


def hf_model(name: str, num_labels: int, *, dropout: bool = True, **changes) -> nn.Module:
    """The transformers model `name` with random weights, built from its config
    (`changes` replace config fields, e.g. a narrower, shallower variant for fast tests)."""
    import transformers

    family, fields = HF_CONFIGS[name]
    fields = dict(fields, num_labels=num_labels, **changes)
    if not dropout:
        fields.update(NO_DROPOUT[family])
    config = getattr(transformers, f"{family}Config")(**fields)
    return getattr(transformers, f"{family}ForImageClassification")(config)


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random weights that keep a signal alive, and random BatchNorm/LayerNorm affine
    parameters and running statistics (HF's initialisation makes logits ~0 and would
    hide errors). Running statistics are first measured on random images, then jittered,
    so that activations neither vanish nor saturate in deep networks."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=generator) * (high - low) + low

    norms = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                fan_in = module.weight[0].numel()
                noise = torch.randn(module.weight.shape, generator=generator)
                module.weight.copy_(noise * math.sqrt(2.0 / fan_in))
                if module.bias is not None:
                    module.bias.copy_(uniform(module.bias.shape, -0.1, 0.1))
            elif isinstance(module, nn.BatchNorm2d | nn.LayerNorm):
                module.weight.copy_(uniform(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(uniform(module.bias.shape, -0.2, 0.2))
                if isinstance(module, nn.BatchNorm2d):
                    norms.append((module, module.momentum))
                    module.reset_running_stats()
                    module.momentum = None  # cumulative: one batch sets the statistics
        was_training = model.training
        model.train()
        logits(model, torch.randn((4, 3, 224, 224), generator=generator))
        model.train(was_training)
        for module, momentum in norms:
            module.momentum = momentum
            spread = module.running_var.sqrt()
            module.running_mean.add_(spread * uniform(spread.shape, -0.2, 0.2))
            module.running_var.mul_(uniform(spread.shape, 0.7, 1.4))
            module.num_batches_tracked.zero_()
        # Logits of order 1 (float32 rounding grows with their size, the tolerance not).
        head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        model.eval()
        spread = logits(model, torch.randn((4, 3, 224, 224), generator=generator)).std()
        head.weight.div_(spread / 2)
        head.bias.div_(spread / 2)
        model.train(was_training)
    return model


class Bottleneck(nn.Module):
    """torchvision's `Bottleneck` (stride in the 3x3 convolution)."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchvisionResNet50(nn.Module):
    """torchvision `resnet50` with the reference's `fc = Sequential(Dropout, Linear)`."""

    def __init__(self, num_classes: int, dropout: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = 64
        for stage, (depth, width) in enumerate(
            zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)
        ):
            blocks = []
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(Bottleneck(in_channels, width, stride))
                in_channels = width * 4
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(2048, num_classes))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def logits(model: nn.Module, images_nchw) -> torch.Tensor:
    """The model's logits (HF models return an output object)."""
    out = model(torch.as_tensor(images_nchw))
    return out.logits if hasattr(out, "logits") else out
