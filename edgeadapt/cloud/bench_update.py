"""`edgeadapt bench update`: what each update-package compression mode costs in bytes and in accuracy.

An update is trained the way the cloud trains one (``Trainer`` on a temporary store, CEMA distillation from the
teacher) on the first part of every corruption of the FMNIST-C stream; then for every compression mode the
package from version 0 to that update is built, verified and applied exactly as a device would, and the
reconstructed parameters are scored on held-out stream samples (the later part of every corruption) with the
torch edge model. Scoring is done as a device uses an update: the device keeps normalizing with statistics of
its current domain (its own EMA) and takes the update's affine parameters and adapters, so each batch of 64
held-out samples of one corruption is normalized with its own statistics (``scoring="domain"``, default;
``scoring="eval"`` uses the update's published running statistics, i.e. a device that has no statistics of its
own yet). Training uploads keep the stream's order (one corruption after the other), as a device sends them,
so the trainer's groups are single-domain. ``acc_delta`` is in
percentage points against the uncompressed update; ``ratio`` is the raw float32 size of the adaptable tensors
over the package size (header and signature included).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgeadapt.core import signing
from edgeadapt.core.bundle import read_manifest
from edgeadapt.core.tensorfile import params_hash
from edgeadapt.core.update_package import MODES, build_package, raw_fp32_bytes, verify_and_apply


def _split(corruption: np.ndarray, train_fraction: float, max_train: int,
           max_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """Per corruption: the first ``train_fraction`` for training, the rest held out; evenly capped."""
    groups = [np.flatnonzero(corruption == c) for c in np.unique(corruption)]
    n_groups = len(groups)
    train, held = [], []
    for idx in groups:
        cut = int(round(len(idx) * train_fraction))
        train.append(idx[:cut][: max(1, max_train // n_groups)])
        held.append(idx[cut:][: max(1, max_eval // n_groups)])
    return np.concatenate(train), np.concatenate(held)


def _accuracy(bundle_dir: Path, params, x: np.ndarray, y: np.ndarray, manifest, domains: np.ndarray | None = None,
              batch: int = 64, student_model: str | None = None) -> float:
    """Accuracy of the edge model with ``params``: with ``domains``, every batch of up to ``batch`` samples of
    one domain is normalized with its own statistics (as a device in that domain does); else eval mode."""
    import torch

    from edgeadapt.cloud.edge_model import rebuild_edge_model
    from edgeadapt.cloud.trainer import batch_statistics, to_float_batch

    model = rebuild_edge_model(bundle_dir, params, student_model).eval()
    chunks = []
    if domains is None:
        chunks = [np.arange(i, min(i + 512, len(x))) for i in range(0, len(x), 512)]
    else:
        for d in np.unique(domains):
            idx = np.flatnonzero(domains == d)
            chunks += [idx[i : i + batch] for i in range(0, len(idx), batch)]
    correct = 0
    with torch.no_grad(), batch_statistics(model, domains is not None):
        for idx in chunks:
            pred = model(to_float_batch(list(x[idx]), manifest)).argmax(1).numpy()
            correct += int((pred == y[idx]).sum())
    return correct / max(1, len(x))


def run_update_bench(
    bundle_dir: str | Path,
    teacher_arch: str,
    teacher_weights: str | Path | None,
    stream_path: str | Path,
    *,
    modes: Sequence[str] = MODES,
    mode_opts: dict[str, dict] | None = None,
    train_fraction: float = 0.5,
    max_train: int = 3000,
    max_eval: int = 3000,
    seed: int = 0,
    trainer: dict | None = None,
    scoring: str = "domain",
    progress: Callable[[str], None] | None = None,
    student_model: str | None = None,
) -> dict:
    """Train one update on part of the stream and score every compression mode. -> the JSON-able report::

        {"raw_fp32_bytes": int, "modes": {MODE: {"bytes", "ratio", "acc", "acc_delta", "max_abs_err"}}, ...}

    ``mode_opts``: per-mode options for ``build_package`` (e.g. ``{"ternary": {"density": 0.2}}``);
    ``trainer``: TrainerConfig overrides; ``scoring``: "domain" or "eval" (module docstring); ``student_model``: the
    bundle's architecture as ``module:factory`` when it is not a registered one (the cloud's ``--student-model``).
    """
    import torch

    from edgeadapt.cloud.config import TrainerConfig
    from edgeadapt.cloud.edge_model import load_teacher
    from edgeadapt.cloud.store import NewSample, SQLiteStore
    from edgeadapt.cloud.trainer import Trainer
    from edgeadapt.datasets.fmnist import load_stream

    say = progress or (lambda msg: None)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    stream = load_stream(stream_path)
    x, y = stream["x"], np.asarray(stream["y"])
    corruption = np.asarray(stream.get("corruption", np.zeros(len(x), np.int64)))
    if list(x.shape[1:]) != list(manifest.input.shape):
        raise ValueError(f"stream images are {list(x.shape[1:])}, the bundle's model takes {manifest.input.shape}")
    if scoring not in ("domain", "eval"):
        raise ValueError(f"scoring must be domain or eval, not {scoring!r}")
    train_idx, eval_idx = _split(corruption, train_fraction, max_train, max_eval)
    torch.manual_seed(seed)
    mode_opts = mode_opts or {}
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; use {MODES}")

    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-update-") as tmp:
        store = SQLiteStore(tmp)
        teacher = load_teacher(teacher_arch, teacher_weights)
        cfg = TrainerConfig(**{"holdout_fraction": 0.0, "seed": seed, "enabled": False, **(trainer or {})})
        tr = Trainer(bundle_dir, store, teacher, cfg, auto_rollout=False, student_model=student_model)
        store.add_device("bench")
        dev = store.get_device("bench")
        say(f"uploading {len(train_idx)} stream samples")
        samples = [NewSample(sample_id=f"s{int(i):07d}", input=x[i], logits=np.zeros(manifest.num_classes, np.float32),
                             entropy=0.0, ood_score=0.0, novel=False, param_version=0) for i in train_idx]
        for i in range(0, len(samples), 512):
            store.add_samples(dev.id, samples[i : i + 512])
        say("training the update (CEMA distillation)")
        t0 = time.perf_counter()
        result = tr.train_now()
        train_s = time.perf_counter() - t0
        if result.status != "published":
            raise RuntimeError(f"training did not produce a version: {result.status} ({result.reason})")
        base, target = store.get_params(0), store.get_params(result.version)
        store.close()

    x_eval, y_eval = x[eval_idx], y[eval_idx]
    d_eval = corruption[eval_idx] if scoring == "domain" else None
    say(f"scoring on {len(eval_idx)} held-out samples")
    acc_source = _accuracy(bundle_dir, base, x_eval, y_eval, manifest, d_eval, student_model=student_model)
    acc_target = _accuracy(bundle_dir, target, x_eval, y_eval, manifest, d_eval, student_model=student_model)
    with torch.no_grad():
        from edgeadapt.cloud.trainer import to_float_batch

        correct = 0
        for i in range(0, len(x_eval), 512):
            correct += int((teacher(to_float_batch(list(x_eval[i : i + 512]), manifest)).argmax(1).numpy()
                            == y_eval[i : i + 512]).sum())
        teacher_acc = correct / max(1, len(x_eval))
    key = signing.generate_private_key()
    pub = signing.public_key_b64(key)
    raw = raw_fp32_bytes(target)
    report_modes: dict[str, dict] = {}
    for mode in modes:
        say(f"mode {mode}")
        opts = mode_opts.get(mode, {})
        t1 = time.perf_counter()
        data = build_package(manifest.model_name, 0, base, result.version, target, mode, key, **opts)
        build_s = time.perf_counter() - t1
        _, recon, header = verify_and_apply(data, pub, manifest.model_name, 0, base)
        acc = _accuracy(bundle_dir, recon, x_eval, y_eval, manifest, d_eval, student_model=student_model)
        err = max(float(np.abs(recon[n] - target[n]).max()) for n in target) if target else 0.0
        report_modes[mode] = {"bytes": len(data), "ratio": raw / len(data), "acc": acc,
                              "acc_delta": round((acc - acc_target) * 100.0, 6), "max_abs_err": err,
                              "lossless": params_hash(recon) == params_hash(target), "build_s": build_s,
                              **({"opts": opts} if opts else {})}
    ok = [(m, r) for m, r in report_modes.items() if r["acc_delta"] >= -0.5]
    best = max(ok, key=lambda mr: mr[1]["ratio"]) if ok else None
    return {
        "raw_fp32_bytes": raw,
        "best": None if best is None else {"mode": best[0], "ratio": best[1]["ratio"], "acc_delta": best[1]["acc_delta"]},
        "tensors": len(target),
        "modes": report_modes,
        "train_samples": int(len(train_idx)),
        "eval_samples": int(len(eval_idx)),
        "train_steps": result.steps,
        "train_seconds": train_s,
        "source_acc": acc_source,
        "updated_acc": acc_target,
        "teacher_acc": teacher_acc,
        "update_gain_points": (acc_target - acc_source) * 100.0,
        "seed": seed,
        "scoring": scoring,
    }
