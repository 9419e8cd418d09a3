"""Zero-initialized low-rank adapters, attached so that original parameter names are kept.

An adapter on module ``c`` is a submodule ``c.adapter`` added to c's output by a forward hook, so ``c.weight``
keeps its name and the model is unchanged at insertion (parity holds at export):
- on a convolution: down = conv with c's kernel/stride/padding to ``rank`` channels, up = 1x1 back to c's output
  channels (zero-initialized);
- on a linear layer: down = linear to ``rank``, up = linear back (zero-initialized); it works on any leading
  shape, so ViT token MLPs and ConvNeXt's channels-last MLPs get adapters too.

Which modules: a pattern list of fnmatch globs over module names and ``kind:NAME`` selectors
(``ADAPTER_KINDS``). Without a selector the kind is ``conv`` (dense convolutions with a kernel > 1, as before
pointwise and linear adapters existed), so a bundle's recorded patterns rebuild exactly the adapters it was
exported with: the cloud calls ``insert_adapters(model, rank, manifest.adapters["patterns"])``. On depthwise
nets (MobileNet, EfficientNet) ``kind:pointwise`` covers the 1x1 expand/project convolutions that hold most of
the weights; on ViTs ``kind:linear`` covers the MLPs.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

#: conv: groups == 1, kernel > 1x1 (the stem excluded when no glob is given); pointwise: groups == 1, 1x1;
#: linear: nn.Linear except the classifier head (the last one) and the projections inside nn.MultiheadAttention
#: (its forward reads their weights directly, so a hook there would never run)
ADAPTER_KINDS = ("conv", "pointwise", "linear")
KIND_PREFIX = "kind:"


class LowRankConvAdapter(nn.Module):
    def __init__(self, conv: nn.Conv2d, rank: int):
        super().__init__()
        self.down = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.up = nn.Conv2d(rank, conv.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LowRankLinearAdapter(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int):
        super().__init__()
        self.down = nn.Linear(linear.in_features, rank, bias=False)
        self.up = nn.Linear(rank, linear.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def _hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    return output + module.adapter(inputs[0])


def split_patterns(patterns: list[str] | None) -> tuple[set[str], list[str]]:
    """(kinds, globs) of a pattern list; kinds default to {"conv"}; an unknown kind is a ValueError."""
    kinds = {p[len(KIND_PREFIX):] for p in patterns or [] if p.startswith(KIND_PREFIX)}
    unknown = sorted(kinds - set(ADAPTER_KINDS))
    if unknown:
        raise ValueError(f"unknown adapter kind(s) {unknown}: use kind:{', kind:'.join(ADAPTER_KINDS)}")
    globs = [p for p in patterns or [] if not p.startswith(KIND_PREFIX)]
    return kinds or {"conv"}, globs


def _kind(name: str, m: nn.Module, head: str | None, in_mha: set[str]) -> str | None:
    if isinstance(m, nn.Conv2d) and m.groups == 1:
        return "pointwise" if m.kernel_size == (1, 1) else "conv"
    if isinstance(m, nn.Linear) and name != head and name not in in_mha:
        return "linear"
    return None


def adapter_targets(model: nn.Module, patterns: list[str] | None = None) -> list[str]:
    """Module names that get adapters: the selected kinds, filtered by the globs; with no glob, all of them but
    the first dense k > 1 convolution (the stem, which sees raw pixels)."""
    kinds, globs = split_patterns(patterns)
    modules = list(model.named_modules())
    linears = [n for n, m in modules if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    in_mha = {f"{n}.{c}" if n else c for n, m in modules if isinstance(m, nn.MultiheadAttention)
              for c, sub in m.named_modules() if isinstance(sub, nn.Linear)}
    cands = [(n, k) for n, m in modules if (k := _kind(n, m, head, in_mha)) in kinds]
    if globs:
        return [n for n, _ in cands if any(fnmatch.fnmatch(n, p) for p in globs)]
    stem = next((n for n, k in cands if k == "conv"), None)
    return [n for n, _ in cands if n != stem]


def insert_adapters(model: nn.Module, rank: int, patterns: list[str] | None = None, seed: int = 0) -> list[str]:
    if rank <= 0:
        raise ValueError("adapter rank must be positive")
    targets = adapter_targets(model, patterns)
    if not targets:
        kinds, _ = split_patterns(patterns)
        raise ValueError(f"no module matches the adapter patterns {patterns} (kinds {sorted(kinds)}; depthwise nets "
                         "have few dense k>1 convs: try kind:pointwise, and kind:linear for transformers)")
    modules = dict(model.named_modules())
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name in targets:
            mod = modules[name]
            mod.adapter = (LowRankLinearAdapter(mod, rank) if isinstance(mod, nn.Linear)
                           else LowRankConvAdapter(mod, rank))
            mod.register_forward_hook(_hook)
    finally:
        torch.random.set_rng_state(gen_state)
    return targets
