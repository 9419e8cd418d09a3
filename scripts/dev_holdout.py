"""The held-out development setup on which loop and device defaults are chosen (never the test stream's labels).

The reference models are retrained without 2,000 held-out training images, and the dev stream is the 15
corruptions (severity 5, other seeds) of exactly those images, the same 2,000 per corruption as the test stream
has: images neither model has seen, like the test stream's. A dev stream of training images overstates what the
teacher's labels are worth (docs/NOTES.md).

    python scripts/dev_holdout.py setup            # ~6 min on 2 cores: models, stream, bundle under --out
    python scripts/dev_holdout.py gradual          # the dev stream's gradual companion (severity 1->5->1)
    python scripts/dev_holdout.py device           # device alone on the dev stream (--method SPEC)
    python scripts/dev_holdout.py wild --methods 'a=SPEC;b=SPEC;eata' --settings continual,mixed --batch 1
                                                   # every method on every wild-traffic setting, one run
    python scripts/dev_holdout.py fleet NAME       # bench fleet on the dev stream (issue 18); cloud knobs via env,
                                                   # e.g. EDGEADAPT_CLOUD_GROUPS__REPLAY=own
    python scripts/dev_holdout.py demo NAME        # `edgeadapt demo` on the dev stream (--round-steps N, --fps F...)
    python scripts/dev_holdout.py loop NAME        # the full loop (real processes, lockstep 8); knobs via env:
                                                   # EDGEADAPT_CLOUD_TRAINER__STEPS_PER_CHUNK=1 ..., --method,
                                                   # --upload-all (every sample uploaded),
                                                   # --sync-every 0 (asynchronous, as the demo runs)
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

HELD_OUT = 2000
SEED = 2026
DEV_SEED = 4242  # corruption seed of the dev stream (the test stream's is 0)


def setup(out: Path) -> None:
    from edgeadapt.assets import cloud_home, public_key_file
    from edgeadapt.core.signing import load_public_key_b64
    from edgeadapt.datasets.fmnist import CHUNK, CORRUPTIONS, _corrupt_chunk, load_fmnist
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch
    from edgeadapt.models.training import load_weights, train_model

    (out / "models").mkdir(parents=True, exist_ok=True)
    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    held = np.sort(np.random.default_rng(SEED).choice(len(x), HELD_OUT, replace=False))
    keep = np.setdiff1d(np.arange(len(x)), held)
    if not (out / "dev_stream.npz").is_file():
        parts = [_corrupt_chunk((name, 5, DEV_SEED, ci, x[held][s : s + CHUNK]))
                 for name in CORRUPTIONS for ci, s in enumerate(range(0, HELD_OUT, CHUNK))]
        np.savez(out / "dev_stream.npz", x=np.concatenate(parts), y=np.tile(y[held], len(CORRUPTIONS)).astype(np.int64),
                 corruption=np.repeat(np.arange(len(CORRUPTIONS)), HELD_OUT), corruption_names=np.array(CORRUPTIONS))
    for arch in ("resnet_edge", "resnet_teacher"):
        path = out / "models" / f"{arch}.safetensors"
        if not path.is_file():
            train_model(arch, path, data=(x[keep], y[keep], xt, yt))
    if not (out / "bundle" / "manifest.json").is_file():
        model = build_arch("resnet_edge")
        load_weights(model, out / "models" / "resnet_edge.safetensors")
        profile = ExportProfile()
        idx = np.random.default_rng(0).choice(keep, profile.calib_samples, replace=False)
        key = load_public_key_b64(public_key_file(cloud_home()))
        export_bundle(model, ExportSpec(arch="resnet_edge", model_name="fmnist-edge", labels=FMNIST_LABELS,
                                        input_shape=[1, 32, 32], cloud_public_key=key), x[idx], y[idx],
                      out / "bundle", profile)
    print(f"dev setup ready in {out}")


def dev_clean() -> tuple[np.ndarray, np.ndarray]:
    """The held-out training images (and labels) the dev stream is built from, in its order."""
    from edgeadapt.datasets.fmnist import load_fmnist

    x, y = load_fmnist("train")
    held = np.sort(np.random.default_rng(SEED).choice(len(x), HELD_OUT, replace=False))
    return x[held], y[held]


def gradual(out: Path) -> Path:
    """The dev stream's gradual companion (severity 1 -> 5 -> 1 per corruption, same held-out images)."""
    from edgeadapt.bench.streams import build_gradual

    return build_gradual(out / "dev_stream.npz", dev_clean()[0], seed=DEV_SEED)


def device(out: Path, method: str) -> None:
    from edgeadapt.bench.accuracy import run_device
    from edgeadapt.core.bundle import Bundle

    d = np.load(out / "dev_stream.npz")
    r = run_device(Bundle(out / "bundle"), d["x"], d["y"], 64, method, select=True)
    print(json.dumps({"method": method, "acc": r["acc"], "upload_frac": r["upload_frac"]}))


SETTINGS = "continual,class-sorted,correlated:0.1,correlated:0.01,mixed,gradual,recurring:5"


def wild(out: Path, methods: list[str], settings: list[str], batch: int, limit: int | None, bundle: Path,
         json_out: Path | None, reliability: str = "") -> dict:
    """Online accuracy of several device methods (``name=spec``; tent and eata as torch references) on every
    setting of the dev stream, in one run, so they are compared on the same sequence. ``reliability``:
    ``KEY=VALUE,...`` fields of the device rows' reliability policy (core/reliability.py)."""
    from edgeadapt.bench.accuracy import run_accuracy_bench
    from edgeadapt.core.reliability import ReliabilityPolicy
    from edgeadapt.datasets.fmnist import load_fmnist

    specs = dict(m.split("=", 1) if "=" in m else (m, m) for m in methods)
    rows = list(specs)
    device_specs = {k: v for k, v in specs.items() if k not in ("tent", "eata")}
    fisher_x = None
    if "eata" in specs:  # EATA's Fisher on clean training images the dev stream was not built from
        x, _ = load_fmnist("train")
        held = np.sort(np.random.default_rng(SEED).choice(len(x), HELD_OUT, replace=False))
        keep = np.setdiff1d(np.arange(len(x)), held)
        fisher_x = x[np.random.default_rng(0).choice(keep, 2000, replace=False)]
    if "gradual" in settings:
        gradual(out)
    policy = ReliabilityPolicy(**dict(kv.split("=", 1) for kv in reliability.split(",") if kv))
    res: dict = {"batch": batch, "limit": limit, "methods": specs, "reliability": policy.model_dump(), "settings": {}}
    for st in settings:
        r = run_accuracy_bench(bundle, out / "dev_stream.npz", stream=st, batch=batch, rows=rows,
                               methods=device_specs, limit=limit, fisher_x=fisher_x,
                               engine_opts={"reliability": policy})
        res["settings"][st] = {k: {kk: v[kk] for kk in ("acc", "acc_per_pass", "acc_per_severity", "seconds")
                                   if kk in v} for k, v in r["rows"].items()}
        print(st, " ".join(f"{k}={v['acc']:.4f}" for k, v in r["rows"].items()), flush=True)
        if json_out:
            json_out.write_text(json.dumps(res, indent=1))
    return res


def loop(out: Path, name: str, method: str, upload_all: bool = False, sync_every: int = 8) -> None:
    from edgeadapt.assets import cloud_home
    from edgeadapt.bench.loop import run_loop

    d = np.load(out / "dev_stream.npz")
    work = out / f"loop-{name}"
    shutil.rmtree(work, ignore_errors=True)
    r = run_loop(out / "bundle", "resnet_teacher", out / "models" / "resnet_teacher.safetensors", cloud_home(),
                 d["x"], d["y"], sync_every=sync_every, work=work, domains=d["corruption"], method=method,
                 upload_all=upload_all)
    (out / f"loop-{name}.json").write_text(json.dumps(r, indent=1))
    print(json.dumps({k: r.get(k) for k in ("acc", "upload_frac", "versions_applied", "rolled_back",
                                            "acc_by_rounds_since_shift", "acc_per_domain")}))


def demo(out: Path, name: str, **pacing) -> None:
    """`edgeadapt demo` on the dev stream and models (its pacing is chosen here); ``pacing``: run_demo's knobs."""
    from rich.console import Console

    from edgeadapt.demo import run_demo

    s = run_demo(out / f"demo-{name}", console=Console(force_terminal=False),
                 assets=(out / "dev_stream.npz", "resnet_teacher", out / "models" / "resnet_teacher.safetensors",
                         out / "bundle"), **{k: v for k, v in pacing.items() if v is not None})
    rounds = s["cloud_rounds"]
    row = {"name": name, **{k: s[k] for k in ("method", "fps", "train_every", "round_steps", "round_uploads",
                                              "stream_seconds")},
           **s["acc"], "gain_points": round((s["acc"]["full_loop"] - s["acc"]["device_only"]) * 100, 2),
           "updates_applied": s["updates"].get("applied", 0), "rounds": len(rounds),
           "round_s_median": float(np.median([r["seconds"] for r in rounds if r.get("seconds") is not None] or [0]))}
    (out / f"demo-{name}.json").write_text(json.dumps({**row, "summary": s}, indent=1, default=float))
    print(json.dumps(row))


def fleet(out: Path, name: str, default_models: bool = False, rows: str = "global,per_group",
          adapters: int = 0) -> None:
    """`bench fleet` (its defaults: 12 devices, 3 groups x 3 corruptions, 256 images each) on the dev stream.
    ``default_models``: the reference bundle and teacher instead of the dev ones (they trained on the dev stream's
    clean images, so the teacher's labels are better than on unseen images: for comparing variants only)."""
    from edgeadapt.assets import cloud_home, default_bundle, default_teacher
    from edgeadapt.bench.fleet import run_fleet

    if default_models:
        arch, weights = default_teacher()
        bundle = default_bundle(adapters=adapters)
    else:
        arch, weights, bundle = "resnet_teacher", out / "models" / "resnet_teacher.safetensors", out / "bundle"
    r = run_fleet(bundle, out / "dev_stream.npz", arch, weights, cloud_home(), rows=tuple(rows.split(",")))
    r["models"] = "default (trained on the dev images)" if default_models else "dev"
    (out / f"fleet-{name}.json").write_text(json.dumps(r, indent=1))
    print(json.dumps({"name": name, "models": r["models"], **{k: v["acc"] for k, v in r["rows"].items()},
                      **r.get("targets", {})}))


def main() -> None:
    from edgeadapt.bench.accuracy import DEFAULT_DEVICE_METHOD

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["setup", "gradual", "device", "wild", "loop", "fleet",
                                                               "demo"])
    ap.add_argument("name", nargs="?", default="run", help="loop: the run's name")
    ap.add_argument("--method", default=DEFAULT_DEVICE_METHOD)
    ap.add_argument("--upload-all", action="store_true", help="loop: every sample uploaded (loop_upload_all)")
    ap.add_argument("--sync-every", type=int, default=8, help="loop: lockstep every K batches (0: asynchronous, "
                                                              "as the demo runs)")
    ap.add_argument("--methods", default="source=none,norm_stats,device_best=" + DEFAULT_DEVICE_METHOD,
                    help="wild: comma-separated name=spec (tent, eata: torch references)")
    ap.add_argument("--reliability", default="", help="wild: the device rows' reliability policy fields, "
                    "KEY=VALUE,... (e.g. adapt_factor=0.4; default: core/reliability.py's)")
    ap.add_argument("--settings", default=SETTINGS, help="wild: comma-separated settings (bench/streams.py)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="wild: first N images per corruption")
    ap.add_argument("--bundle", type=Path, default=None, help="wild: bundle (default: OUT/bundle)")
    ap.add_argument("--json", type=Path, default=None, help="wild: write the results here")
    ap.add_argument("--default-models", action="store_true", help="fleet: the reference bundle and teacher")
    ap.add_argument("--rows", default="global,per_group", help="fleet: rows")
    ap.add_argument("--adapters", type=int, default=0, help="fleet, --default-models: the reference bundle with "
                                                             "rank-N conv adapters")
    for knob in ("fps", "train_every", "round_steps", "round_uploads", "per_corruption"):
        ap.add_argument(f"--{knob.replace('_', '-')}", type=float if knob == "fps" else int, default=None,
                        help="demo: run_demo's knob (default: the demo's)")
    ap.add_argument("--out", type=Path, default=Path("~/.cache/edgeadapt/dev-holdout").expanduser())
    a = ap.parse_args()
    if a.what == "setup":
        setup(a.out)
        gradual(a.out)
    elif a.what == "gradual":
        print(gradual(a.out))
    elif a.what == "wild":
        wild(a.out, [m for m in a.methods.split(";" if ";" in a.methods else ",") if m],
             [s for s in a.settings.split(",") if s], a.batch, a.limit, a.bundle or a.out / "bundle", a.json,
             a.reliability)
    elif a.what == "device":
        device(a.out, a.method)
    elif a.what == "fleet":
        fleet(a.out, a.name, a.default_models, a.rows, a.adapters)
    elif a.what == "demo":
        demo(a.out, a.name, method=None if a.method == DEFAULT_DEVICE_METHOD else a.method, fps=a.fps, train_every=a.train_every, round_steps=a.round_steps,
             round_uploads=a.round_uploads, per_corruption=a.per_corruption)
    else:
        loop(a.out, a.name, a.method, a.upload_all, a.sync_every)


if __name__ == "__main__":
    main()
