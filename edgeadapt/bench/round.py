"""`edgeadapt bench round`: what one training round costs in-process vs as a Ray task (issue 18 item 4).

Each executor gets a fresh SQLite store with the reference bundle, a device's ``uploads`` images of the FMNIST-C
stream per round (split train/holdout as ingest splits them) and the default trainer config, and runs ``rounds``
rounds through ``CloudService.trainer.train_now``, the path the admin API's ``train`` takes. Reported: building the
trainer (in-process: teacher, student, replay index in the serve process; Ray: connecting, i.e. starting a local
Ray), then each round's wall time, where round 1 on Ray also builds the worker's trainer (a cold worker) and later
rounds reuse it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _add_uploads(store, x: np.ndarray, round_no: int, holdout_fraction: float) -> None:
    from edgeadapt.cloud.service import sample_split
    from edgeadapt.cloud.store import NewSample, NotFound

    try:
        dev = store.get_device("bench-cam")
    except NotFound:
        dev = store.authenticate(store.add_device("bench-cam"))
    samples = []
    for i, xi in enumerate(x):
        sid = f"r{round_no}-{i}"
        samples.append(NewSample(sample_id=sid, input=xi, logits=np.zeros(10, np.float32), entropy=1.0,
                                 ood_score=0.0, novel=False, param_version=0,
                                 split=sample_split("bench-cam", sid, False, holdout_fraction)))
    store.add_samples(dev.id, samples)


def run_round_bench(bundle: Path, stream_path: Path, teacher: str, teacher_weights: Path, signing_home: Path,
                    executors: tuple[str, ...] = ("inprocess", "ray"), uploads: int = 256, rounds: int = 3,
                    torch_threads: int = 1, ray_address: str | None = None) -> dict:
    import os

    from edgeadapt.cloud.config import load_config
    from edgeadapt.cloud.service import CloudService

    data = np.load(stream_path)
    x = data["x"]
    out: dict = {"uploads_per_round": uploads, "rounds": rounds, "torch_threads": torch_threads,
                 "cpus": os.cpu_count(), "executors": {}}
    for executor in executors:
        with tempfile.TemporaryDirectory(prefix=f"edgeadapt-bench-round-{executor}-") as work:
            trainer = {"enabled": False, "executor": executor, "torch_threads": torch_threads,
                       **({"ray_address": ray_address} if ray_address else {})}
            cfg = load_config(signing_home, {"bundle": str(bundle), "teacher": teacher,
                                             "teacher_weights": str(teacher_weights), "store_dir": str(Path(work)),
                                             "trainer": trainer}, environ={})
            t0 = time.perf_counter()
            svc = CloudService(cfg, signing_home)
            if executor == "ray":
                svc.trainer.connect()
            row: dict = {"setup_s": round(time.perf_counter() - t0, 2), "rounds": []}
            try:
                for r in range(rounds):
                    _add_uploads(svc.store, x[(r * uploads) % len(x):][:uploads], r, cfg.trainer.holdout_fraction)
                    t = time.perf_counter()
                    res = svc.trainer.train_now(limit=cfg.trainer.max_samples_per_round)
                    wall = time.perf_counter() - t
                    row["rounds"].append({"wall_s": round(wall, 2), "train_s": round(res.seconds, 2),
                                          "steps": res.steps, "samples": res.samples, "status": res.status,
                                          "version": res.version})
                if executor == "ray":
                    row["ray"] = svc.trainer.ray_state
                    row["worker"] = svc.trainer.last_worker
            finally:
                svc.stop()
            warm = [r["wall_s"] for r in row["rounds"][1:]]
            row["first_round_s"] = row["rounds"][0]["wall_s"]
            row["warm_round_s"] = round(float(np.median(warm)), 2) if warm else None
            out["executors"][executor] = row
    ex = out["executors"]
    if "inprocess" in ex and "ray" in ex and ex["inprocess"]["warm_round_s"] and ex["ray"]["warm_round_s"]:
        out["ray_overhead_warm_s"] = round(ex["ray"]["warm_round_s"] - ex["inprocess"]["warm_round_s"], 2)
    return out
