"""Small versions of the architectures people deploy, written here because torchvision's wheel does not import on
the CPU torch used in this project. Each keeps the operators and layer types of its family (what export has to get
right), at widths that export in about a second:

- ``resnet``: BatchNorm BasicBlocks with a strided 1x1 downsample (ResNet);
- ``mobilenetv3``: inverted residuals, depthwise 3x3, squeeze-excitation with hardsigmoid, hardswish (MobileNetV3);
- ``efficientnet``: MBConv with SiLU, SE with sigmoid, stochastic depth, dropout (EfficientNet);
- ``convnext``: depthwise 7x7, channels-last LayerNorm, GELU MLP, layer scale (ConvNeXt);
- ``vit``: patch embedding, class token, ``nn.MultiheadAttention`` (batch_first), pre-LN blocks (torchvision's ViT);
- ``groupnorm``: a plain CNN with GroupNorm (detection/segmentation backbones, small-batch training).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

BN_FAMILIES = ("resnet", "mobilenetv3", "efficientnet")
AFFINE_FAMILIES = ("convnext", "vit", "groupnorm")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.down is None else self.down(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + idt)


class ResNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = _Block(width, width, 1)
        self.layer2 = _Block(width, 2 * width, 2)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _SE(nn.Module):
    def __init__(self, ch: int, squeeze: int, gate: Callable[[torch.Tensor], torch.Tensor], act: type[nn.Module]):
        super().__init__()
        self.fc1 = nn.Conv2d(ch, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, ch, 1)
        self.act = act()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * self.gate(s)


class _InvertedResidual(nn.Module):
    """MobileNetV3 / EfficientNet MBConv: 1x1 expand, depthwise kxk, SE, 1x1 project (+ residual)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act: type[nn.Module],
                 gate: Callable[[torch.Tensor], torch.Tensor], se_act: type[nn.Module], drop_path: float = 0.0):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), act())
        self.se = _SE(mid, max(4, mid // 4), gate, se_act)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        if not self.residual:
            return y
        if self.training and self.drop_path > 0:  # stochastic depth (torchvision's StochasticDepth "row")
            keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) >= self.drop_path
            y = y * keep / (1.0 - self.drop_path)
        return x + y


class MobileNetV3(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.Hardswish())
        self.blocks = nn.Sequential(
            _InvertedResidual(width, width, 2, 1, nn.Hardswish, F.hardsigmoid, nn.ReLU),
            _InvertedResidual(width, 2 * width, 3, 2, nn.Hardswish, F.hardsigmoid, nn.ReLU),
        )
        self.head = nn.Sequential(nn.Linear(2 * width, 4 * width), nn.Hardswish(), nn.Dropout(0.2),
                                  nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class EfficientNet(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.SiLU())
        self.blocks = nn.Sequential(
            _InvertedResidual(width, width, 1, 1, nn.SiLU, torch.sigmoid, nn.SiLU, drop_path=0.1),
            _InvertedResidual(width, 2 * width, 4, 2, nn.SiLU, torch.sigmoid, nn.SiLU, drop_path=0.1),
        )
        self.top = nn.Sequential(nn.Conv2d(2 * width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width), nn.SiLU())
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.top(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: LayerNorm over channels of an NCHW tensor (permute, LN, permute)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)  # channels-last, as ConvNeXt does
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 4, 4), LayerNorm2d(width, eps=1e-6))
        self.stage1 = _ConvNeXtBlock(width)
        self.down = nn.Sequential(LayerNorm2d(width, eps=1e-6), nn.Conv2d(width, 2 * width, 2, 2))
        self.stage2 = _ConvNeXtBlock(2 * width)
        self.norm = nn.LayerNorm(2 * width, eps=1e-6)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """torchvision's VisionTransformer layout: conv patch embedding, class token, learned positions."""

    def __init__(self, in_ch: int, num_classes: int, image_size: int, width: int = 16, patch: int = 8, depth: int = 2):
        super().__init__()
        self.patch = patch
        self.conv_proj = nn.Conv2d(in_ch, width, patch, patch)
        n = (image_size // patch) ** 2
        self.class_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        self.layers = nn.Sequential(*[_EncoderBlock(width, 2) for _ in range(depth)])
        self.ln = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        x = self.ln(self.layers(x))
        return self.head(x[:, 0])


class GroupNormCNN(nn.Module):
    def __init__(self, in_ch: int, num_classes: int, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, 1, 1), nn.GroupNorm(2, width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.GroupNorm(4, 2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, 2, 1), nn.GroupNorm(1, 2 * width), nn.ReLU(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def build(family: str, input_shape: tuple[int, int, int], num_classes: int, seed: int = 0) -> nn.Module:
    """A family's small model with non-trivial normalization state (eval mode): BatchNorm statistics from a
    train-mode pass over random inputs, affine parameters of every norm layer moved off 1/0, so a graph that
    dropped or swapped one of them would fail parity."""
    torch.manual_seed(seed)
    c, h, _ = input_shape
    factories: dict[str, Callable[[], nn.Module]] = {
        "resnet": lambda: ResNet(c, num_classes),
        "mobilenetv3": lambda: MobileNetV3(c, num_classes),
        "efficientnet": lambda: EfficientNet(c, num_classes),
        "convnext": lambda: ConvNeXt(c, num_classes),
        "vit": lambda: ViT(c, num_classes, image_size=h, patch=h // 4),
        "groupnorm": lambda: GroupNormCNN(c, num_classes),
    }
    model = factories[family]()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.mul_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
        model.train()
        for _ in range(2):
            model(torch.rand(16, *input_shape))
    return model.eval()


# -- factories for `edgeadapt export --model tests.export_zoo:NAME` (no arguments) -------------------------------
class RGBResNet(ResNet):
    """A 3x40x40, 7-class ResNet that declares its input shape (as timm models do), so export reads it."""

    input_shape = (3, 40, 40)

    def __init__(self) -> None:
        super().__init__(3, 7)


class ErfinvNet(ResNet):
    """Uses an operator the ONNX exporter does not have (aten::erfinv at opset 17)."""

    def __init__(self) -> None:
        super().__init__(1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.erfinv(x * 0.1))


class BakedBatchNet(ResNet):
    """Flattens with ``len(x)``: a Python int the tracer records as a constant (the batch size is baked)."""

    def __init__(self) -> None:
        super().__init__(1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).view(len(x), -1))


class ShapeBatchNet(BakedBatchNet):
    """The same with ``x.reshape(x.shape[0], -1)``: traced as a shape op, so any batch size works."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        p = F.adaptive_avg_pool2d(x, 1)
        return self.fc(p.reshape(p.shape[0], -1))


class BatchNorm1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.bn = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(torch.flatten(F.adaptive_avg_pool2d(self.conv(x), 1), 1)))
