"""Choose the grouping distances (cloud/grouping.py) on the dev stream, never the test stream.

Devices run ``--method`` (default: the device's ``DEFAULT_METHOD``) on disjoint images of one corruption of the dev stream
(scripts/dev_holdout.py; no labels are read); after each batch, each reports its domain signature. Printed: the
distances between devices in the same corruption (what a group must hold together) and between devices in
different corruptions (what must fall apart), as quantiles, after 1, 2 and 4 batches of a new domain. The
defaults of ``GroupsConfig`` come from this table (docs/NOTES.md, "Fleet grouping").

    python scripts/fleet_thresholds.py [--devices 4] [--images 256]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dev", type=Path, default=Path.home() / ".cache/edgeadapt/dev-holdout/dev_stream.npz")
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--images", type=int, default=256, help="images per device and corruption")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--method", default=None, help="the devices' method (default: DEFAULT_METHOD)")
    args = ap.parse_args()
    from edgeadapt.assets import default_bundle
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.core.domain_signature import distance
    from edgeadapt.datasets.fmnist import load_stream
    from edgeadapt.device.config import DEFAULT_METHOD
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    d = load_stream(args.dev)
    bundle = Bundle(default_bundle())
    names = d["corruption_names"]
    nb = args.images // args.batch
    sigs: dict[tuple[int, int], list[np.ndarray]] = {}  # (corruption, device) -> signature after each batch
    for c in range(len(names)):
        idx = np.flatnonzero(d["corruption"] == c)
        for dev in range(args.devices):
            eng = AdaptiveEngine(bundle, EngineConfig(method=args.method or DEFAULT_METHOD))
            part = idx[dev * args.images:(dev + 1) * args.images]
            out = []
            for b in range(nb):
                eng.process(d["x"][part[b * args.batch:(b + 1) * args.batch]])
                out.append(eng.domain_signature())
            sigs[(c, dev)] = out
    table = {}
    for after in sorted({1, 2, nb} & set(range(1, nb + 1))):
        same, other = [], []
        for (c1, d1), (c2, d2) in itertools.combinations(sorted(sigs), 2):
            dist = distance(sigs[(c1, d1)][after - 1], sigs[(c2, d2)][after - 1])
            (same if c1 == c2 else other).append(dist)
        q = [0.0, 0.5, 0.9, 0.99, 1.0]
        table[f"after {after} batches"] = {
            "same corruption": [round(float(v), 4) for v in np.quantile(same, q)],
            "other corruption": [round(float(v), 4) for v in np.quantile(other, [0.0, 0.01, 0.05, 0.1, 0.5])]}
    print(json.dumps({"quantiles": {"same": "min, p50, p90, p99, max", "other": "min, p1, p5, p10, p50"},
                      "devices": args.devices, "images": args.images, **table}, indent=1))


if __name__ == "__main__":
    main()
