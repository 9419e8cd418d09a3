"""`edgeadapt bench accuracy`: online accuracy on the FMNIST-C stream (DESIGN §10).

Online: every batch is scored with the prediction made before that batch adapts anything (for methods that
normalize with the batch's own statistics, the prediction of that same forward pass, as in Tent).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeadapt.bench.streams import Stream, build_gradual, build_stream, gradual_path, load_gradual, parse_spec
from edgeadapt.core.bundle import Bundle
from edgeadapt.core.wire import UploadSample, WireArray
from edgeadapt.device.config import DEFAULT_METHOD
from edgeadapt.device.engine import AdaptiveEngine, EngineConfig
from edgeadapt.device.ood import DEFAULT_DETECTOR
from edgeadapt.device.selection import SampleSelector

#: device_best and the loop rows run the same method, the device's default (with or without a cloud)
DEFAULT_DEVICE_METHOD = DEFAULT_METHOD


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
    selector = SampleSelector(bundle.manifest.num_classes, engine.config.reliability) if select else None
    hits = np.zeros(len(x), bool)
    uploaded = 0
    lat = []
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        t = time.perf_counter()
        res = engine.process(xb)
        lat.append(time.perf_counter() - t)
        hits[i : i + len(xb)] = res.pred == y[i : i + batch]
        if selector is not None:
            sel = selector.select(res.probs, res.entropy, res.ood, sample_bytes=xb[0].nbytes,
                                  ood_scores=res.ood_score)
            uploaded += len(sel.adapt) + len(sel.novel)
        if progress:
            progress(len(xb))
    dt = time.perf_counter() - t0
    per = wire_bytes(x[0], bundle.manifest.num_classes)
    return {"acc": float(hits.mean()), "hits": hits, "upload_frac": uploaded / len(x), "bytes_up": uploaded * per, "bytes_down": 0,
            "img_s": len(x) / dt, "batch_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "method": method}


def _summary(hits: np.ndarray, stream: Stream) -> dict:
    """What a setting needs beyond one number: accuracy per pass (recurring) and per severity (gradual)."""
    out: dict = {}
    if stream.passes > 1:
        out["acc_per_pass"] = [round(float(hits[stream.pass_index == k].mean()), 4) for k in range(stream.passes)]
    if stream.severity is not None:
        out["acc_per_severity"] = {int(s): round(float(hits[stream.severity == s].mean()), 4)
                                   for s in np.unique(stream.severity)}
    dom = stream.domain
    out["acc_per_domain"] = {stream.names[d]: round(float(hits[dom == d].mean()), 4) for d in np.unique(dom)}
    return out


def load_bench_stream(stream_path: str | Path, spec: str = "continual", limit: int | None = None, seed: int = 0,
                      num_classes: int | None = None) -> Stream:
    """The setting ``spec`` built from the stream file (see bench/streams.py). ``gradual`` reads the companion file
    next to it, building it for the FMNIST-C test stream (its clean images are the first test images)."""
    from edgeadapt.datasets.fmnist import load_fmnist, load_stream

    data = load_stream(stream_path)
    gradual = None
    if parse_spec(spec)[0] == "gradual":
        path = gradual_path(stream_path)
        if not path.is_file():
            if "per_corruption" not in data or "seed" not in data:
                raise ValueError(f"{path} is missing: build the gradual companion of this stream first "
                                 f"(bench/streams.py build_gradual with its clean images)")
            clean, _ = load_fmnist("test")
            build_gradual(stream_path, clean[: int(data["per_corruption"])], int(data["seed"]))
        gradual = load_gradual(path)
    return build_stream(spec, data["x"], data["y"], data["corruption"], data.get("corruption_names"), seed=seed,
                        limit=limit, gradual=gradual, num_classes=num_classes)


def run_accuracy_bench(bundle_dir: str | Path, stream_path: str | Path, stream: str = "continual", batch: int = 64,
                       rows: list[str] | None = None, device_method: str = DEFAULT_DEVICE_METHOD,
                       limit: int | None = None, fisher_path: str | Path | None = None, threads: int = 2,
                       progress_factory=None, sync_every: int = 8, teacher: tuple[str, Path] | None = None,
                       signing_home: Path | None = None, seed: int = 0, methods: dict[str, str] | None = None,
                       fisher_x: np.ndarray | None = None, engine_opts: dict | None = None) -> dict:
    """Online accuracy of each row on one setting. ``methods`` adds device rows by name -> method spec (screening
    several methods in one run, so they are compared on the same stream); ``engine_opts``: EngineConfig fields for
    every device row (e.g. ``reliability``)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    bundle = Bundle(bundle_dir)
    st = load_bench_stream(stream_path, stream, limit=limit, seed=seed, num_classes=bundle.manifest.num_classes)
    x, y = st.x, st.y
    if list(x.shape[1:]) != list(bundle.manifest.input.shape):
        raise ValueError(f"the stream's images are {list(x.shape[1:])}, the bundle's model takes "
                         f"{list(bundle.manifest.input.shape)} (build a stream for it: edgeadapt data folder)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= bundle.manifest.num_classes):
        raise ValueError(f"the stream's labels span {int(y.min())}..{int(y.max())}, the bundle has "
                         f"{bundle.manifest.num_classes} classes")
    domain_names = st.domain_names()
    rows = rows or ["source", "norm_stats", "device_best", "tent", "eata"]
    out: dict = {"stream": stream, "seed": seed, "n": int(len(x)), "batch": batch, "rows": {}}
    specs = {"source": "none", "norm_stats": "norm_stats", "device_best": device_method, **(methods or {})}
    for row in rows:
        bar = progress_factory(row, len(x)) if progress_factory else None
        t0 = time.perf_counter()
        if row in specs:
            res = run_device(bundle, x, y, batch, specs[row], select=(row == "device_best"), threads=threads,
                             progress=bar, **(engine_opts or {}))
            hits = res.pop("hits")
        elif row in ("tent", "eata"):
            from edgeadapt.bench.torch_refs import run_torch_reference

            fx = None
            if row == "eata":
                fx = fisher_x
                if fx is None:
                    from edgeadapt.datasets.fmnist import load_fmnist

                    tx, _ = load_fmnist("train")
                    fx = tx[np.random.default_rng(0).choice(len(tx), 2000, replace=False)]
            preds = run_torch_reference(row, bundle_dir, x, batch, bundle.manifest.num_classes, fisher_x=fx,
                                        threads=threads, progress=bar)
            hits = preds == y
            res = {"acc": float(hits.mean()), "upload_frac": 0.0, "bytes_up": 0, "bytes_down": 0,
                   "img_s": len(x) / (time.perf_counter() - t0)}
        elif row in ("loop", "loop_upload_all"):
            from edgeadapt.bench.loop import run_loop

            if teacher is None or signing_home is None:
                raise ValueError("the loop rows need a teacher and the cloud home whose key the bundle trusts")
            res = run_loop(Path(bundle_dir), teacher[0], teacher[1], signing_home, x, y, batch=batch,
                           sync_every=sync_every, upload_all=(row == "loop_upload_all"), method=device_method,
                           progress=bar, domains=domain_names)
            hits = None
        else:
            raise ValueError(f"unknown row {row!r}")
        if hits is not None:
            res.update(_summary(hits, st))
        out["rows"][row] = res
        out["rows"][row]["seconds"] = round(time.perf_counter() - t0, 2)
    return out
