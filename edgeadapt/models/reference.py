"""Reference architectures for the demo, benchmarks and export tests.

Every model takes inputs in [0, 1] (N, 1, 32, 32) and normalizes inside, so the exported graph needs no
preprocessing beyond uint8 -> float. The classifier head is always the last ``nn.Linear`` and is called
``head``; its input is the penultimate feature the device uses for OOD scores and feature methods.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from edgeadapt.core.archs import REGISTERED_ARCHS, arch_problem

FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_LABELS = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]


class Normalize(nn.Module):
    def __init__(self, mean: float = FMNIST_MEAN, std: float = FMNIST_STD):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A 3-stage CIFAR-style ResNet (one or more BasicBlocks per stage) with BatchNorm."""

    def __init__(self, width: int = 16, blocks: int = 1, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.layers(self.stem(self.norm(x)))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class MobileNetTiny(nn.Module):
    """MobileNet-v1-style depthwise-separable CNN."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        self.norm = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6())
        self.blocks = nn.Sequential(
            DepthwiseSeparable(width, width * 2, 2),
            DepthwiseSeparable(width * 2, width * 4, 2),
            DepthwiseSeparable(width * 4, width * 4, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.blocks(self.stem(self.norm(x)))), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ViTTiny(nn.Module):
    """A small vision transformer (patch 4, pre-LayerNorm blocks, mean-pooled tokens)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2, num_classes: int = 10, in_ch: int = 1):
        super().__init__()
        self.norm = Normalize()
        self.patch = nn.Conv2d(in_ch, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 64, dim))
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(self.norm(x)).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.final_norm(self.blocks(t)).mean(dim=1))


class MLPNoNorm(nn.Module):
    """No normalization layer at all: export must refuse it with a clear error."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet_edge": lambda **kw: ResNet(width=16, blocks=1, **kw),
    "resnet_teacher": lambda **kw: ResNet(width=32, blocks=2, **kw),
    "mobilenet_tiny": lambda **kw: MobileNetTiny(**kw),
    "vit_tiny": lambda **kw: ViTTiny(**kw),
    "mlp_nonorm": lambda **kw: MLPNoNorm(**kw),
}


if set(ARCHS) != REGISTERED_ARCHS:  # the torch-free list `bundle verify` checks against must match
    raise RuntimeError(f"edgeadapt.core.archs.REGISTERED_ARCHS {sorted(REGISTERED_ARCHS)} != ARCHS {sorted(ARCHS)}")


def build_arch(name: str, **kwargs) -> nn.Module:
    """Build a reference arch by name, or a user model from ``package.module:factory``.

    Only for names an operator gives (command line, config): a name read from a bundle or a weights file goes
    through ``build_registered`` (or the operator's factory), never here."""
    if name in ARCHS:
        return ARCHS[name](**kwargs)
    if ":" in name:
        import importlib

        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import module {module_name!r} for --model {name!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise ValueError(f"module {module_name!r} has no callable {attr!r} (from --model {name!r})")
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise ValueError(f"unknown arch {name!r}: use one of {sorted(ARCHS)} or package.module:factory")


def build_registered(name: str, **kwargs) -> nn.Module:
    """Build an architecture named by data (a manifest, weights metadata): registered names only, nothing
    imported."""
    if name not in ARCHS:
        raise ValueError(arch_problem(name))
    try:
        return ARCHS[name](**kwargs)
    except TypeError as exc:
        raise ValueError(f"arch {name!r} does not take arch_kwargs {sorted(kwargs)}: {exc}") from None
