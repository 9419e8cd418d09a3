"""Train the reference architectures on clean Fashion-MNIST (demo and benchmarks), save them as safetensors.

- Inputs are float in [0, 1] ``[N, 1, 32, 32]``; the models normalize inside.
- SGD (Nesterov momentum, weight decay) with a one-cycle schedule (warm-up, cosine) for the CNNs, AdamW + one-cycle for the ViT.
- The teacher (``resnet_teacher``) trains with **generic** augmentations implemented here on batches in torch:
  random translation (crop with zero padding), horizontal flip, brightness/contrast jitter, box blur, gaussian
  noise with a random sigma, random erasing. None of them is a benchmark corruption function (no
  ``imagecorruptions`` here).
- Weights are written with ``safetensors`` (never pickle) with metadata: arch, arch_kwargs (JSON), clean_acc,
  epochs, lr, batch_size, seed, augment, train_n, test_n.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeadapt.models.reference import build_arch, build_registered

WEIGHTS_FORMAT = "edgeadapt-weights/1"

#: per-arch training defaults. ``epochs`` may be fractional: the teacher's budget is ~5 min on 2 cores and one
#: full epoch of it costs ~2.5x that there (measured on a shared 2-core Xeon, 1 thread: 0.4 epoch at batch 64 =
#: 375 steps in 263 s -> 79.0 % clean, 63 % on the FMNIST-C stream vs 91 % / 27 % for resnet_edge).
DEFAULTS: dict[str, dict[str, Any]] = {
    "resnet_edge": {"epochs": 2.0, "lr": 0.1, "augment": False, "batch_size": 128, "optimizer": "sgd"},
    "resnet_teacher": {"epochs": 0.4, "lr": 0.1, "augment": True, "batch_size": 64, "optimizer": "sgd"},
    "mobilenet_tiny": {"epochs": 3.0, "lr": 0.1, "augment": False, "batch_size": 128, "optimizer": "sgd"},
    "vit_tiny": {"epochs": 3.0, "lr": 3e-3, "augment": False, "batch_size": 128, "optimizer": "adamw"},
}
ARCHS = tuple(DEFAULTS)


def check_arch(arch: str) -> None:
    if arch not in DEFAULTS:
        raise ValueError(f"unknown arch {arch!r}; trainable reference archs: {', '.join(ARCHS)}")


def resolve_config(
    arch: str,
    epochs: float | None = None,
    lr: float | None = None,
    augment: bool | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, Any]:
    """The effective training configuration (defaults filled in): what the metadata records and what a cached
    file is compared against."""
    check_arch(arch)
    d = DEFAULTS[arch]
    cfg = {
        "arch": arch,
        "epochs": float(d["epochs"] if epochs is None else epochs),
        "lr": float(d["lr"] if lr is None else lr),
        "augment": bool(d["augment"] if augment is None else augment),
        "batch_size": int(d["batch_size"] if batch_size is None else batch_size),
        "seed": int(seed),
        "limit": None if limit is None else int(limit),
        "optimizer": d["optimizer"],
    }
    if cfg["epochs"] <= 0:
        raise ValueError(f"epochs must be > 0, not {cfg['epochs']}")
    if cfg["batch_size"] < 1:
        raise ValueError(f"batch_size must be >= 1, not {cfg['batch_size']}")
    if cfg["limit"] is not None and cfg["limit"] < 1:
        raise ValueError(f"limit must be >= 1, not {cfg['limit']}")
    return cfg


def default_threads() -> int:
    """``$EDGEADAPT_THREADS`` or the CPUs this process may use."""
    env = os.environ.get("EDGEADAPT_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------- augmentation


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _mask(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) < p).view(n, 1, 1, 1)


def random_translate(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded batch (a per-sample shift of up to ``pad`` pixels)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None, :]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (dx[:, None] + torch.arange(w)[None, :]).view(n, 1, 1, w).expand(n, c, h, w)
    return xp.gather(2, rows).gather(3, cols)


def generic_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generic train-time augmentations on a float batch in [0, 1] ``[N, C, H, W]`` (not the benchmark's
    corruption functions). Each op hits a random subset of the batch; some samples stay nearly clean."""
    n = x.shape[0]
    x = random_translate(x, 3, g)
    x = torch.where(_mask(n, 0.5, g), x.flip(-1), x)
    # brightness / contrast jitter around the per-image mean
    m = _mask(n, 0.5, g)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = torch.exp(_uniform(n, math.log(0.15), math.log(1.5), g)).view(n, 1, 1, 1)
    bright = _uniform(n, -0.3, 0.4, g).view(n, 1, 1, 1)
    x = torch.where(m, ((x - mean) * contrast + mean + bright).clamp(0, 1), x)
    # box blur, 3x3 or 5x5
    m3, m5 = _mask(n, 0.15, g), _mask(n, 0.15, g)
    x = torch.where(m3, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), x)
    x = torch.where(m5 & ~m3, F.avg_pool2d(x, 5, 1, 2, count_include_pad=False), x)
    # additive gaussian noise with a random sigma
    m = _mask(n, 0.3, g)
    sigma = _uniform(n, 0.02, 0.35, g).view(n, 1, 1, 1)
    x = torch.where(m, (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1), x)
    # random erasing: one box of 4-20% of the area, random gray value
    m = _mask(n, 0.25, g)
    h, w = x.shape[-2:]
    area = _uniform(n, 0.04, 0.2, g) * h * w
    aspect = torch.exp(_uniform(n, math.log(0.5), math.log(2.0), g))
    bh = (area * aspect).sqrt().clamp(1, h).long()
    bw = (area / aspect).sqrt().clamp(1, w).long()
    y0 = (torch.rand(n, generator=g) * (h - bh + 1)).long()
    x0 = (torch.rand(n, generator=g) * (w - bw + 1)).long()
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    box = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + bh).view(n, 1, 1)) & (xs >= x0.view(n, 1, 1))
           & (xs < (x0 + bw).view(n, 1, 1))).unsqueeze(1)
    value = torch.rand(n, generator=g).view(n, 1, 1, 1)
    x = torch.where(m & box, value, x)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------- train / eval


def _to_float(xb: torch.Tensor) -> torch.Tensor:
    return (xb.float() / 255.0).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Class predictions (int64 ``[N]``) for uint8 images ``[N, 1, 32, 32]`` (or float in [0, 1])."""
    model.eval()
    xt = torch.as_tensor(x)
    out = []
    for i in range(0, len(xt), batch_size):
        xb = xt[i : i + batch_size]
        xb = _to_float(xb) if xb.dtype == torch.uint8 else xb.float()
        out.append(model(xb).argmax(1))
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def evaluate(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
             batch_size: int = 512) -> float:
    """Accuracy of ``model`` on uint8 images ``x`` with labels ``y`` (eval mode: BN uses running stats)."""
    pred = predict(model, x, batch_size)
    return float((pred == np.asarray(y)).mean()) if len(pred) else float("nan")


def _evaluate_with_progress(model: nn.Module, x: np.ndarray, y: np.ndarray, arch: str, show: bool,
                            chunk: int = 256) -> float:
    """``evaluate`` in chunks with a progress display (a teacher's clean evaluation can take tens of seconds on a
    busy machine, and a cold start must never go quiet for long)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from edgeadapt.progress import progress as make_progress

    bar = make_progress(f"evaluate {arch}", TextColumn(f"[bold]evaluate {arch}[/]"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), fmt="clean test images", disable=not show)
    preds = []
    with bar:
        tid = bar.add_task("evaluate", total=len(x))
        for i in range(0, len(x), chunk):
            preds.append(predict(model, x[i : i + chunk], batch_size=chunk))
            bar.update(tid, advance=len(preds[-1]))
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return float((pred == np.asarray(y)).mean()) if len(pred) else float("nan")


def _make_optimizer(model: nn.Module, cfg: dict[str, Any], total_steps: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".pos") else decay).append(p)
    if cfg["optimizer"] == "adamw":
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg["lr"])
    else:
        groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.SGD(groups, lr=cfg["lr"], momentum=0.9, nesterov=True)
    warm = max(1, round(0.2 * total_steps))

    def one_cycle(step: int) -> float:  # linear warm-up from lr/10, cosine down to lr/100
        if step < warm:
            return 0.1 + 0.9 * step / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, one_cycle)
    return opt, sched


def train_model(
    arch: str,
    out: str | Path,
    epochs: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    augment: bool | None = None,
    limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Train reference ``arch`` on clean Fashion-MNIST, evaluate clean test accuracy, save safetensors to ``out``.

    ``limit``: first N training images (quick runs); ``test_limit``: first N test images for the evaluation;
    ``data``: (x_train, y_train, x_test, y_test) uint8/int64 arrays instead of reading the idx files.
    Returns the run's summary (config, clean_acc, seconds, path).
    """
    cfg = resolve_config(arch, epochs, lr, augment, batch_size, seed, limit)
    t_start = time.perf_counter()
    nthreads = threads or default_threads()
    torch.set_num_threads(nthreads)
    if data is None:
        from edgeadapt.datasets import load_fmnist

        x_tr, y_tr = load_fmnist("train")
        x_te, y_te = load_fmnist("test")
    else:
        x_tr, y_tr, x_te, y_te = data
    if cfg["limit"] is not None:
        x_tr, y_tr = x_tr[: cfg["limit"]], y_tr[: cfg["limit"]]
    if test_limit is not None:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    xt = torch.from_numpy(np.ascontiguousarray(x_tr))
    yt = torch.from_numpy(np.ascontiguousarray(y_tr).astype(np.int64))
    n = len(xt)
    bs = min(cfg["batch_size"], n)
    steps_per_epoch = math.ceil(n / bs)
    total_steps = max(1, round(cfg["epochs"] * steps_per_epoch))

    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    arch_kwargs: dict[str, Any] = {}
    model = build_arch(arch, **arch_kwargs).to(memory_format=torch.channels_last)
    opt, sched = _make_optimizer(model, cfg, total_steps)

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from edgeadapt.progress import progress as make_progress

    bar = make_progress(
        f"train {arch}", TextColumn(f"[bold]train {arch}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("epoch {task.fields[epoch]:.2f} loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f}"),
        fmt="steps; epoch {epoch:.2f} loss {loss:.3f} acc {acc:.3f}", disable=not progress)
    model.train()
    loss_ema, acc_ema = float("nan"), float("nan")
    step = 0
    t_train = time.perf_counter()
    with bar:
        tid = bar.add_task("train", total=total_steps, epoch=0.0, loss=float("nan"), acc=float("nan"))
        while step < total_steps:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n, bs):
                if step >= total_steps:
                    break
                idx = perm[i : i + bs]
                xb = xt[idx].float() / 255.0
                if cfg["augment"]:
                    xb = generic_augment(xb, g)
                xb = xb.contiguous(memory_format=torch.channels_last)
                yb = yt[idx]
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                lv = float(loss.detach())
                av = float((logits.detach().argmax(1) == yb).float().mean())
                loss_ema = lv if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * lv
                acc_ema = av if math.isnan(acc_ema) else 0.95 * acc_ema + 0.05 * av
                bar.update(tid, advance=1, epoch=step / steps_per_epoch, loss=loss_ema, acc=acc_ema)
    train_seconds = time.perf_counter() - t_train
    model = model.to(memory_format=torch.contiguous_format)
    clean_acc = _evaluate_with_progress(model, x_te, y_te, arch, progress)

    summary: dict[str, Any] = {
        **cfg,
        "arch_kwargs": arch_kwargs,
        "train_n": n,
        "test_n": int(len(x_te)),
        "steps": total_steps,
        "clean_acc": clean_acc,
        "final_train_loss": loss_ema,
        "threads": nthreads,
        "train_seconds": train_seconds,
    }
    path = save_weights(model, out, summary)
    summary["seconds"] = time.perf_counter() - t_start
    summary["path"] = str(path)
    return summary


# ----------------------------------------------------------------------------------------------- files

_META_KEYS = ("arch", "epochs", "lr", "augment", "batch_size", "seed", "limit", "optimizer", "train_n", "test_n",
              "steps", "clean_acc", "final_train_loss")


def save_weights(model: nn.Module, out: str | Path, info: dict[str, Any]) -> Path:
    """Write ``model.state_dict()`` as safetensors (atomically) with string metadata from ``info``."""
    from safetensors.torch import save_file

    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": WEIGHTS_FORMAT, "arch_kwargs": json.dumps(info.get("arch_kwargs", {}), sort_keys=True)}
    for k in _META_KEYS:
        if k in info:
            meta[k] = json.dumps(info[k])
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a safetensors weights file, JSON values decoded (``arch`` and ``format`` stay strings)."""
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found")
    with safe_open(str(p), framework="pt") as f:
        raw = f.metadata() or {}
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return meta


def metadata_matches(meta: dict[str, Any], cfg: dict[str, Any]) -> bool:
    """Whether a weights file's metadata records the training configuration ``cfg`` (from resolve_config)."""
    keys = ("arch", "epochs", "lr", "augment", "batch_size", "seed", "limit")
    return all(k in meta for k in keys) and all(meta[k] == cfg[k] for k in keys)


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as exc:
            raise ValueError(f"{path}: not a valid safetensors file: {exc}") from exc
    if suffix in (".pt", ".pth", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError, EOFError ...
            raise ValueError(
                f"{path}: cannot load with torch.load(weights_only=True) - only plain state dicts of tensors are "
                f"accepted, no pickled objects: {exc}"
            ) from exc
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
        return obj
    raise ValueError(f"{path}: unsupported weights format {suffix!r}; use .safetensors, .pt or .pth")


def _few(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" ... (+{len(names) - k} more)" if len(names) > k else "")


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` from ``.safetensors`` or a ``.pt``/``.pth`` state dict (weights_only).

    Raises FileNotFoundError for a missing file, ValueError for a bad file or keys/shapes that do not match
    the model (naming a few of them). A ``module.`` prefix (DataParallel) is stripped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found")
    state = _load_state_dict(p)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_few(shapes, 3)}")
    if problems:
        raise ValueError(f"{p} does not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=strict)
    return model


def load_reference_model(path: str | Path) -> nn.Module:
    """Build the reference arch recorded in a safetensors file's metadata and load its weights (eval mode)."""
    meta = read_metadata(path)
    arch = meta.get("arch")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: no 'arch' in the metadata; build the model yourself and use load_weights")
    kwargs = meta.get("arch_kwargs") or {}
    model = build_registered(arch, **kwargs)  # metadata is data: registered names only, nothing imported
    load_weights(model, path)
    return model.eval()
