"""The fleet benchmark (issue 18): many devices in a few drift groups, one real cloud process over HTTP,
lockstep; a lineage per group of similar devices against one global lineage and the devices alone.

Groups: the FMNIST-C stream's corruptions are dealt out in blocks (group g runs corruptions g*C .. g*C+C-1 one
after another, C = ``corruptions``), so at any time the groups sit in different domains while the members of a
group share theirs; each member sees its own images of each corruption (``limit`` per corruption, drawn
without overlap from a seeded permutation). No labels reach the cloud or the grouping.

Devices are real daemons (engine, selection, upload queue, uploader, updater, version manager) in this process,
talking HTTP to a real ``cloud serve`` process, as a fleet of cameras would. Every ``sync_every`` batches of
every device (lockstep): each device uploads what it queued and heartbeats (with its domain signature), the
cloud trains (one round, or one round per group), and each device fetches and applies its update. A device
watches an update for ``sync_every`` batches (its ``watch_batches``) so that it can take the next sync's: a
device still watching answers "busy" and skips the update.

Rows: ``device_only`` (each device's engine alone, the device's default method), ``global`` (one lineage for everyone,
the cloud's default), ``per_group`` (``groups.enabled``). Per row: mean device accuracy, per true group; for
per_group, how the cloud's groups agree with the true groups (one-to-one matching of groups, at the end and over
the syncs); the cloud's CPU-seconds in training calls, per device-hour at a nominal ``fps`` images per second per
device (a camera's rate: the device-hour is the benchmark's convention, said in the result).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from edgeadapt.bench.load import _proc_cpu_s
from edgeadapt.bench.loop import add_device, cloud_process


@dataclass
class FleetDevice:
    name: str
    group: int  # the true group
    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray  # corruption index per image


def fleet_streams(x: np.ndarray, y: np.ndarray, corruption: np.ndarray, devices: int, groups: int,
                  corruptions: int, limit: int, seed: int = 0) -> list[FleetDevice]:
    """Deal devices round-robin into ``groups`` true groups; device d of group g gets ``limit`` images of each of
    its group's ``corruptions`` corruptions (disjoint from its group mates')."""
    n_corr = int(corruption.max()) + 1
    if groups < 1 or devices < groups:
        raise ValueError(f"need at least one device per group ({devices} devices, {groups} groups)")
    if groups * corruptions > n_corr:
        raise ValueError(f"{groups} groups x {corruptions} corruptions exceed the stream's {n_corr} corruptions")
    per_group = -(-devices // groups)
    rng = np.random.default_rng(seed)
    pools = {c: rng.permutation(np.flatnonzero(corruption == c)) for c in range(n_corr)}
    if per_group * limit > min(len(p) for p in pools.values()):
        raise ValueError(f"{per_group} devices x {limit} images exceed the images of a corruption")
    out = []
    for d in range(devices):
        g, m = d % groups, d // groups
        idx = np.concatenate([pools[c][m * limit:(m + 1) * limit]
                              for c in range(g * corruptions, (g + 1) * corruptions)])
        out.append(FleetDevice(f"cam-{d:02d}", g, x[idx], y[idx], corruption[idx]))
    return out


def grouping_agreement(true: list[int], found: list[int | None]) -> float:
    """Fraction of devices in agreement after matching found groups one-to-one with true groups (greedily,
    largest overlap first): splitting a true group or lumping two together both cost."""
    pairs: dict[tuple[int, int], int] = {}
    for t, f in zip(true, found, strict=True):
        if f is not None:
            pairs[(t, f)] = pairs.get((t, f), 0) + 1
    used_t, used_f, agree = set(), set(), 0
    for (t, f), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
        if t not in used_t and f not in used_f:
            used_t.add(t)
            used_f.add(f)
            agree += n
    return agree / max(len(true), 1)


def _device_only(bundle: Path, devs: list[FleetDevice], batch: int, method: str, progress) -> list[np.ndarray]:
    from edgeadapt.core.bundle import Bundle
    from edgeadapt.device.engine import AdaptiveEngine, EngineConfig

    b = Bundle(bundle)
    hits = []
    for dev in devs:
        eng = AdaptiveEngine(b, EngineConfig(method=method))
        h = np.zeros(len(dev.y), bool)
        for i in range(0, len(dev.y), batch):
            res = eng.process(dev.x[i:i + batch])
            h[i:i + batch] = res.logits.argmax(1) == dev.y[i:i + batch]
            if progress:
                progress(len(res.logits))
        hits.append(h)
    return hits


def _cloud_row(bundle: Path, teacher: str, teacher_weights: Path, signing_home: Path, devs: list[FleetDevice],
               batch: int, sync_every: int, method: str, grouped: bool, work: Path, progress) -> dict:
    from edgeadapt.device.config import DeviceConfig
    from edgeadapt.device.daemon import DeviceDaemon

    env = {"EDGEADAPT_CLOUD_GROUPS__ENABLED": "true" if grouped else "false"}
    hits = [np.zeros(len(d.y), bool) for d in devs]
    found_over_time: list[float] = []
    train_cpu, train_wall, rounds, published, rejected = 0.0, 0.0, 0, 0, 0
    with cloud_process(bundle, teacher, teacher_weights, signing_home, work, env=env) as c:
        admin = {"Authorization": f"Bearer {c['admin']}"}
        pid = c["cloud_proc"].pid
        daemons = []
        try:
            for dev in devs:
                token = add_device(c, dev.name)
                daemons.append(DeviceDaemon(DeviceConfig(
                    bundle=bundle, state_dir=work / "devices" / dev.name, cloud_url=c["cloud"], token=token,
                    method=method, update_poll_s=3600.0, update_long_poll_s=0.0, upload_interval_s=3600.0, threads=1,
                    watch_batches=sync_every)))
            n_batches = max(-(-len(d.y) // batch) for d in devs)
            with httpx.Client(timeout=600) as http:
                for b in range(n_batches):
                    for k, (dev, dmn) in enumerate(zip(devs, daemons, strict=True)):
                        xb = dev.x[b * batch:(b + 1) * batch]
                        if len(xb):
                            pred = dmn.predict_in_step(xb).pred
                            hits[k][b * batch:b * batch + len(xb)] = pred == dev.y[b * batch:b * batch + len(xb)]
                            if progress:
                                progress(len(xb))
                    if (b + 1) % sync_every and b + 1 < n_batches:
                        continue
                    for dmn in daemons:  # upload everything queued, then report the domain
                        while dmn.uploader.send_once():
                            pass
                        dmn.updater.heartbeat()
                    cpu0, t0 = _proc_cpu_s(pid), time.perf_counter()
                    tr = http.post(f"{c['cloud']}/v1/admin/train", headers=admin)
                    tr.raise_for_status()
                    cpu1 = _proc_cpu_s(pid)
                    train_wall += time.perf_counter() - t0
                    train_cpu += (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else 0.0
                    res = tr.json()
                    parts = res.get("groups") or [res]
                    rounds += sum(p["status"] != "idle" for p in parts)
                    published += sum(p["status"] == "published" for p in parts)
                    rejected += sum(p["status"] == "rejected" for p in parts)
                    for dmn in daemons:
                        dmn.updater.check_once()
                    if grouped:
                        found = _found_groups(http, c["cloud"], admin, devs)
                        found_over_time.append(grouping_agreement([d.group for d in devs], found))
                final_groups = http.get(f"{c['cloud']}/v1/admin/groups", headers=admin).json() if grouped else []
                found = _found_groups(http, c["cloud"], admin, devs) if grouped else None
                versions = [dmn.engine.param_version for dmn in daemons]
                applied = sum(int(dmn.updater.counters.get("applied", 0)) for dmn in daemons)
                rolled_back = sum(int(dmn.updater.counters.get("rolled_back", 0)) for dmn in daemons)
        finally:
            for dmn in daemons:
                dmn.stop()
    out = {"hits": hits, "train_cpu_s": round(train_cpu, 2), "train_wall_s": round(train_wall, 2),
           "rounds": rounds, "published": published, "gate_rejections": rejected, "versions_applied": applied,
           "rolled_back": rolled_back, "final_versions": versions}
    if grouped:
        out["grouping"] = {"agreement_final": round(grouping_agreement([d.group for d in devs], found), 4),
                           "agreement_mean_over_syncs": round(float(np.mean(found_over_time)), 4)
                           if found_over_time else None,
                           "agreement_per_sync": [round(a, 3) for a in found_over_time],
                           "device_groups": dict(zip([d.name for d in devs], found, strict=True)),
                           "groups": [{k: g[k] for k in ("id", "members", "version", "mean_entropy", "spread",
                                                         "note")} for g in final_groups]}
    return out


def _found_groups(http: httpx.Client, url: str, admin: dict, devs: list[FleetDevice]) -> list[int | None]:
    groups = http.get(f"{url}/v1/admin/groups", headers=admin)
    groups.raise_for_status()
    of = {m: g["id"] for g in groups.json() for m in g["members"]}
    return [of.get(d.name) for d in devs]


def _accuracy(hits: list[np.ndarray], devs: list[FleetDevice]) -> dict:
    per_dev = [float(h.mean()) for h in hits]
    groups = sorted({d.group for d in devs})
    return {"acc": round(float(np.mean(per_dev)), 4),
            "acc_per_group": {str(g): round(float(np.mean([a for a, d in zip(per_dev, devs, strict=True)
                                                            if d.group == g])), 4) for g in groups},
            "acc_per_device": [round(a, 4) for a in per_dev]}


def run_fleet(bundle: Path, stream_path: Path, teacher: str, teacher_weights: Path, signing_home: Path,
              devices: int = 12, groups: int = 3, corruptions: int = 3, limit: int = 256, seed: int = 0,
              batch: int = 64, sync_every: int = 2, rows: tuple[str, ...] = ("device_only", "global", "per_group"),
              fps: float = 1.0, method: str | None = None, work: Path | None = None,
              progress_factory: Callable[[str, int], Callable[[int], None]] | None = None) -> dict:
    from edgeadapt.datasets.fmnist import load_stream
    from edgeadapt.device.config import DEFAULT_METHOD

    method = method or DEFAULT_METHOD
    data = load_stream(stream_path)
    devs = fleet_streams(data["x"], data["y"], data["corruption"], devices, groups, corruptions, limit, seed)
    names = data["corruption_names"]
    images = sum(len(d.y) for d in devs)
    device_hours = images / fps / 3600.0
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="edgeadapt-fleet-")) if own else work
    result: dict = {"bundle": Path(bundle).name, "devices": devices, "groups": groups, "corruptions_per_group": corruptions, "limit": limit,
                    "seed": seed, "batch": batch, "sync_every": sync_every, "method": method, "images": images,
                    "fps": fps, "device_hours": round(device_hours, 4),
                    "true_groups": {str(g): [names[c] for c in range(g * corruptions, (g + 1) * corruptions)]
                                    for g in range(groups)},
                    "rows": {}}
    t_all = time.perf_counter()
    try:
        for row in rows:
            progress = progress_factory(row, images) if progress_factory else None
            t0 = time.perf_counter()
            if row == "device_only":
                r: dict = {"hits": _device_only(bundle, devs, batch, method, progress)}
            elif row in ("global", "per_group"):
                sub = work / row
                sub.mkdir(parents=True, exist_ok=True)
                r = _cloud_row(bundle, teacher, teacher_weights, signing_home, devs, batch, sync_every, method,
                               row == "per_group", sub, progress)
                r["train_cpu_s_per_device_hour"] = round(r["train_cpu_s"] / device_hours, 2)
            else:
                raise ValueError(f"unknown row {row!r}: use device_only, global, per_group")
            r = {**_accuracy(r.pop("hits"), devs), **r, "seconds": round(time.perf_counter() - t0, 1)}
            result["rows"][row] = r
    except Exception:
        if own:
            raise RuntimeError(f"fleet run failed; logs kept in {work}") from None
        raise
    if own:
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    rs = result["rows"]
    if "global" in rs and "per_group" in rs:
        g, p = rs["global"], rs["per_group"]
        worse = [k for k in p["acc_per_group"] if p["acc_per_group"][k] < g["acc_per_group"][k]]
        result["targets"] = {
            "per_group_minus_global_points": round(100 * (p["acc"] - g["acc"]), 2),
            "per_group_ge_global_plus_3": p["acc"] >= g["acc"] + 0.03,
            "groups_worse_than_global": worse,
            "grouping_agreement_ge_0.9": p["grouping"]["agreement_final"] >= 0.9,
        }
    return result
