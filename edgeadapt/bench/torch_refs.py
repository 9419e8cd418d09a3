"""Backprop test-time adaptation references (Tent, EATA) in torch — used only inside the benchmarks.

Faithful to the public definitions: Tent (Wang et al. 2021) minimizes prediction entropy w.r.t. BN affine
parameters, normalizing with test-batch statistics, one step per batch, and reports the prediction of the
forward pass that computed the loss (before the step). EATA (Niu et al. 2022) adds reliable-sample
selection (E < 0.4 ln C), redundancy filtering by cosine similarity to a moving average of probabilities
(d_margin), re-weighting 1/exp(E - E0), and a Fisher anti-forgetting regularizer fitted on clean data.
Optimizer defaults follow the public CIFAR-10-C configurations (Adam, lr 1e-3, β=(0.9, 0.999)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeadapt.cloud.edge_model import rebuild_edge_model as rebuild_torch_model


def _configure_bn(model: nn.Module) -> list[nn.Parameter]:
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            params += [m.weight, m.bias]
        elif isinstance(m, nn.LayerNorm):
            m.requires_grad_(True)
            params += [m.weight, m.bias]
    return params


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class Tent:
    def __init__(self, model: nn.Module, lr: float = 1e-3):
        self.model = model
        self.params = _configure_bn(model)
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        loss = _entropy(logits).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return logits.detach()


class EATA:
    def __init__(self, model: nn.Module, num_classes: int, fisher_x: torch.Tensor | None = None, lr: float = 1e-3,
                 e_margin_factor: float = 0.4, d_margin: float = 0.4, fisher_alpha: float = 1.0):
        self.model = model
        self.params = _configure_bn(model)
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.999))
        self.e_margin = e_margin_factor * math.log(num_classes)
        self.d_margin = d_margin
        self.alpha = fisher_alpha
        self.current_probs: torch.Tensor | None = None
        self.fishers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if fisher_x is not None and fisher_alpha > 0:
            self._fit_fisher(fisher_x)

    def _fit_fisher(self, x: torch.Tensor) -> None:
        names = {id(p): n for n, p in self.model.named_parameters()}
        fisher = {id(p): torch.zeros_like(p) for p in self.params}
        batches = list(torch.split(x, 64))
        for xb in batches:
            logits = self.model(xb)
            loss = F.cross_entropy(logits, logits.argmax(1))
            self.model.zero_grad()
            loss.backward()
            for p in self.params:
                if p.grad is not None:
                    fisher[id(p)] += p.grad.detach() ** 2 / len(batches)
        self.fishers = {names[id(p)]: (fisher[id(p)], p.detach().clone()) for p in self.params}
        self.model.zero_grad()

    def step(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        ent = _entropy(logits)
        keep = ent < self.e_margin
        probs = logits.softmax(1)
        if self.current_probs is not None and keep.any():
            cos = F.cosine_similarity(self.current_probs.unsqueeze(0), probs[keep], dim=1)
            idx = torch.nonzero(keep).squeeze(1)
            redundant = idx[cos.abs() >= self.d_margin]
            keep[redundant] = False
        if keep.any():
            sel = probs[keep].detach()
            mean = sel.mean(0)
            self.current_probs = mean if self.current_probs is None else 0.9 * self.current_probs + 0.1 * mean
            e = ent[keep]
            coeff = 1.0 / torch.exp(e.detach() - self.e_margin)
            loss = (e * coeff).mean()
            if self.fishers:
                reg = sum((f * (p - p0) ** 2).sum() for n, p in self.model.named_parameters()
                          if n in self.fishers for f, p0 in [self.fishers[n]])
                loss = loss + self.alpha * reg
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return logits.detach()


def run_torch_reference(name: str, bundle_dir: str | Path, x: np.ndarray, batch: int, num_classes: int,
                        fisher_x: np.ndarray | None = None, threads: int = 2, progress=None) -> np.ndarray:
    """Online predictions of Tent or EATA over a uint8 stream; returns predicted classes."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = rebuild_torch_model(bundle_dir)
    if name == "tent":
        algo = Tent(model)
    elif name == "eata":
        fx = torch.from_numpy(fisher_x.astype(np.float32) / 255.0) if fisher_x is not None else None
        algo = EATA(model, num_classes, fisher_x=fx)
    else:
        raise ValueError(f"unknown torch reference {name!r}")
    preds = np.empty(len(x), np.int64)
    for i in range(0, len(x), batch):
        xb = torch.from_numpy(x[i : i + batch].astype(np.float32) / 255.0)
        preds[i : i + batch] = algo.step(xb).argmax(1).numpy()
        if progress:
            progress(len(xb))
    return preds
