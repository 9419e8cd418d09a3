"""Zero-initialized low-rank convolution adapters, attached so that original parameter names are kept.

An adapter on conv ``c`` is a submodule ``c.adapter`` (down: conv with c's kernel/stride/padding to ``rank``
channels; up: 1x1 back to c's output channels, zero-initialized) added to c's output by a forward hook, so
``c.weight`` keeps its name and the model is unchanged at insertion (parity holds at export).
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn


class LowRankConvAdapter(nn.Module):
    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(inputs[0])


def adapter_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Convs that get adapters: groups == 1, kernel > 1x1; by default all such but the first (the stem)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1 and m.kernel_size != (1, 1)]
    if patterns:
        return [n for n in convs if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return convs[1:]


def insert_adapters(model: nn.Module, rank: int, patterns: list[str] | None = None, seed: int = 0) -> list[str]:
    if rank <= 0:
        raise ValueError("adapter rank must be positive")
    targets = adapter_targets(model, patterns)
    if not targets:
        raise ValueError(f"no convolution matches the adapter patterns {patterns}")
    modules = dict(model.named_modules())
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in targets:
            conv = modules[name]
            conv.adapter = LowRankConvAdapter(conv, rank)
            conv.register_forward_hook(_hook)
    finally:
        torch.random.set_rng_state(gen_state)
    return targets
