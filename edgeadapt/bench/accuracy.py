"""`edgeadapt bench accuracy`: online accuracy on the FMNIST-C stream (DESIGN §10).

Online: every batch is scored with the prediction made before that batch adapts anything (for methods that
normalize with the batch's own statistics, the prediction of that same forward pass, as in Tent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeadapt.core.bundle import Bundle
from edgeadapt.core.wire import UploadSample, WireArray
from edgeadapt.device.config import LOOP_METHOD
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
from edgeadapt.device.ood import DEFAULT_DETECTOR
from edgeadapt.device.selection import SampleSelector

#: device_best and the loop rows run the same method, the one a device in the loop runs
DEFAULT_DEVICE_METHOD = LOOP_METHOD


def class_sorted(x: np.ndarray, y: np.ndarray, domain: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same images; within each domain segment sorted by label, so batches hold one or two classes."""
    order = np.lexsort((y, domain))
    return x[order], y[order], domain[order]


def wire_bytes(x: np.ndarray, num_classes: int) -> int:
    """Size of one upload on the wire (the JSON of an UploadSample)."""
    s = UploadSample(id="0" * 32, input=WireArray.from_numpy(x), logits=[0.123456] * num_classes, entropy=0.5,
                     ood_score=0.5)
    return len(s.model_dump_json())


def run_device(bundle: Bundle, x: np.ndarray, y: np.ndarray, batch: int, method: str, select: bool = False,
               ood_detector: str = DEFAULT_DETECTOR, threads: int = 2, progress: Callable[[int], None] | None = None,
               **engine_opts) -> dict:
    engine = AdaptiveEngine(bundle, EngineConfig(method=method, ood_detector=ood_detector, threads=threads,
                                                 **engine_opts))
    selector = SampleSelector(bundle.manifest.num_classes) if select else None
    correct = 0
    uploaded = 0
    lat = []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        t = time.perf_counter()
        res = engine.process(xb)
        lat.append(time.perf_counter() - t)
        correct += int((res.pred == y[i : i + batch]).sum())
        if selector is not None:
            sel = selector.select(res.probs, res.entropy, res.ood, sample_bytes=xb[0].nbytes,
                                  ood_scores=res.ood_score)
            uploaded += len(sel.adapt) + len(sel.novel)
        if progress:
            progress(len(xb))
    dt = time.perf_counter() - t0
    per = wire_bytes(x[0], bundle.manifest.num_classes)
    return {"acc": correct / len(x), "upload_frac": uploaded / len(x), "bytes_up": uploaded * per, "bytes_down": 0,
            "img_s": len(x) / dt, "batch_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "method": method}


def run_accuracy_bench(bundle_dir: str | Path, stream_path: str | Path, stream: str = "continual", batch: int = 64,
                       rows: list[str] | None = None, device_method: str = DEFAULT_DEVICE_METHOD,
                       limit: int | None = None, fisher_path: str | Path | None = None, threads: int = 2,
                       progress_factory=None, sync_every: int = 8, teacher: tuple[str, Path] | None = None,
                       signing_home: Path | None = None) -> dict:
    from edgeadapt.datasets.fmnist import load_stream

    data = load_stream(stream_path)
    x, y, dom = data["x"], data["y"], data["corruption"]
    if limit:
        # a subset that keeps every domain: the first `limit` per domain
        keep = np.concatenate([np.flatnonzero(dom == d)[:limit] for d in np.unique(dom)])
        x, y, dom = x[keep], y[keep], dom[keep]
    if stream == "class-sorted":
        x, y, dom = class_sorted(x, y, dom)
    elif stream != "continual":
        raise ValueError(f"stream must be continual or class-sorted, got {stream!r}")
    names = data.get("corruption_names")
    domain_names = np.array([str(names[d]) for d in dom]) if names is not None else dom
    bundle = Bundle(bundle_dir)
    rows = rows or ["source", "norm_stats", "device_best", "tent", "eata"]
    out: dict = {"stream": stream, "n": int(len(x)), "batch": batch, "rows": {}}
    specs = {"source": "none", "norm_stats": "norm_stats", "device_best": device_method}
    for row in rows:
        bar = progress_factory(row, len(x)) if progress_factory else None
        t0 = time.perf_counter()
        if row in specs:
            res = run_device(bundle, x, y, batch, specs[row], select=(row == "device_best"), threads=threads,
                             progress=bar)
        elif row in ("tent", "eata"):
            from edgeadapt.bench.torch_refs import run_torch_reference

            fisher_x = None
            if row == "eata":
                from edgeadapt.datasets.fmnist import load_fmnist

                fx, _ = load_fmnist("train")
                fisher_x = fx[np.random.default_rng(0).choice(len(fx), 2000, replace=False)]
            preds = run_torch_reference(row, bundle_dir, x, batch, bundle.manifest.num_classes, fisher_x=fisher_x,
                                        threads=threads, progress=bar)
            res = {"acc": float((preds == y).mean()), "upload_frac": 0.0, "bytes_up": 0, "bytes_down": 0,
                   "img_s": len(x) / (time.perf_counter() - t0)}
        elif row in ("loop", "loop_upload_all"):
            from edgeadapt.bench.loop import run_loop

            if teacher is None or signing_home is None:
                raise ValueError("the loop rows need a teacher and the cloud home whose key the bundle trusts")
            res = run_loop(Path(bundle_dir), teacher[0], teacher[1], signing_home, x, y, batch=batch,
                           sync_every=sync_every, upload_all=(row == "loop_upload_all"), method=device_method,
                           progress=bar, domains=domain_names)
        else:
            raise ValueError(f"unknown row {row!r}")
        out["rows"][row] = res
        out["rows"][row]["seconds"] = round(time.perf_counter() - t0, 2)
    return out
