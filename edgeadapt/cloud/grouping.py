"""Groups of devices in similar domains, each with a lineage of versions of its own (issue 18).

A device reports its domain signature with its heartbeats (core/domain_signature.py: its adapted normalization
statistics, projected; distances ~ the RMS per-channel shift between two domains). The clustering is online,
deterministic (groups and devices visited in id order, no random draws) and cheap (one distance per group per
heartbeat):

- **assign** (each heartbeat): a member stays while it is within ``leave_distance`` of its group's centroid
  or within ``join_distance`` of a group mate's latest signature; otherwise (or when new) it joins the group
  of the nearest device within ``join_distance`` (so a whole group that moves domain together follows its
  first member there), else the group of the nearest centroid within ``join_distance``, else founds a new
  group whose lineage starts at the version the device runs (nothing is re-served until that group trains).
- **regroup** (before each training round, and ``cloud groups --regroup``): a group whose members lie farther
  apart than ``split_distance`` is split by 2-means seeded with its farthest pair (the larger half keeps the
  group, the other half founds a new one starting at the group's current version); two groups whose centroids
  are within ``merge_distance`` merge into the larger (the other is dissolved, its members served the
  survivor's version next). Empty groups are dissolved.

A centroid is the mean of its members' latest signatures. What the groups are for: the trainer trains one round
per group from that group's uploads (cloud/trainer.py), rollouts can name a group, and a device is served the
version of its group (cloud/service.py).
"""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np

from edgeadapt.cloud.config import GroupsConfig
from edgeadapt.cloud.store import Device, DeviceGroup, NotFound, Store
from edgeadapt.core.domain_signature import distance

log = logging.getLogger(__name__)


class Grouper:
    def __init__(self, store: Store, config: GroupsConfig):
        self.store = store
        self.cfg = config
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading
    def members(self) -> dict[int, list[Device]]:
        """Active group id -> its devices (id order); devices with a signature but no group are left out."""
        out: dict[int, list[Device]] = {g.id: [] for g in self.store.fleet.list_groups()}
        for d in sorted(self.store.list_devices(), key=lambda d: d.id):
            if d.group_id in out and d.revoked is None:
                out[d.group_id].append(d)
        return out

    def head_version(self, group: DeviceGroup) -> int:
        """The version a group's lineage is at: its newest trained version, else the one it started from."""
        latest = self.store.versions.latest_in_lineage(group.id)
        return group.base_version if latest is None else int(latest)

    # ------------------------------------------------------------------ assign (per heartbeat)
    def observe(self, device: Device, values: list[float], entropy: float | None = None) -> int:
        """Keep the device's signature and (re)assign it; -> its group id."""
        self.store.fleet.set_signature(device.id, values, entropy)
        sig = np.asarray(values, np.float64)
        with self._lock:
            groups = {g.id: g for g in self.store.fleet.list_groups()}
            current = device.group_id if device.group_id in groups else None
            others = [d for d in self.store.list_devices() if d.id != device.id and d.group_id in groups
                      and d.revoked is None and d.signature and len(d.signature) == len(sig)]
            mates = [d for d in others if d.group_id == current]
            if current is not None and (self._fits(groups[current], sig, self.cfg.leave_distance)
                                        or any(distance(sig, d.signature) <= self.cfg.join_distance for d in mates)):
                self._refresh(current)
                return current
            # the group of the nearest device that already reported this domain (a whole group that moves domain
            # together follows its first member), else the nearest centroid, else a new group
            near = sorted((distance(sig, d.signature), d.id, d.group_id) for d in others if d.group_id != current)
            near = [(dist, gid) for dist, _, gid in near if dist <= self.cfg.join_distance]
            if not near:
                near = sorted((distance(sig, g.centroid), g.id) for g in groups.values()
                              if g.id != current and g.centroid is not None and len(g.centroid) == len(sig))
                near = [x for x in near if x[0] <= self.cfg.join_distance]
            if near:
                gid = near[0][1]
                note = "joined"
            else:
                gid = self.store.fleet.add_group(int(device.version or 0), sig.tolist(),
                                                 note=f"founded by {device.name}")
                note = "founded"
            self.store.fleet.set_device_group(device.id, gid)
            log.info("device %s %s group %d%s", device.name, note, gid,
                     f" (left group {current})" if current is not None else "")
            self._refresh(gid)
            if current is not None:
                self._refresh(current)
            return gid

    @staticmethod
    def _fits(group: DeviceGroup, sig: np.ndarray, limit: float) -> bool:
        return group.centroid is not None and len(group.centroid) == len(sig) and distance(sig, group.centroid) <= limit

    def _refresh(self, gid: int) -> list[Device]:
        """Recompute a group's centroid from its members' latest signatures; dissolve it when it has none."""
        members = [d for d in self.store.list_devices() if d.group_id == gid and d.revoked is None and d.signature]
        if not members:
            try:
                self.store.fleet.update_group(gid, dissolve=True)
                log.info("group %d dissolved (no members)", gid)
            except NotFound:
                pass
            return []
        dims = {len(d.signature) for d in members}
        if len(dims) == 1:
            self.store.fleet.update_group(gid, centroid=np.mean([d.signature for d in members], axis=0).tolist())
        return members

    # ------------------------------------------------------------------ regroup (per round)
    def regroup(self) -> list[str]:
        """Split groups whose members drifted apart, merge groups that converged; -> what changed, in words."""
        changes: list[str] = []
        with self._lock:
            for gid, devs in self.members().items():
                if not devs:
                    self._refresh(gid)
                    continue
                changes += self._maybe_split(gid, [d for d in devs if d.signature])
            changes += self._merge_close()
        for c in changes:
            log.info("regroup: %s", c)
        return changes

    def _maybe_split(self, gid: int, devs: list[Device]) -> list[str]:
        if len(devs) < 2 or len({len(d.signature) for d in devs}) != 1:
            return []
        sigs = np.array([d.signature for d in devs], np.float64)
        pairs = [(distance(sigs[i], sigs[j]), -i, -j) for i, j in itertools.combinations(range(len(devs)), 2)]
        far, i, j = max(pairs)
        if far <= self.cfg.split_distance:
            return []
        centers = sigs[[-i, -j]]
        for _ in range(20):  # 2-means from the farthest pair: deterministic, converges in a few steps
            side = np.array([int(np.linalg.norm(s - centers[1]) < np.linalg.norm(s - centers[0])) for s in sigs])
            if side.min() == side.max():
                return []
            new = np.array([sigs[side == k].mean(0) for k in (0, 1)])
            if np.allclose(new, centers):
                break
            centers = new
        keep = 0 if (side == 0).sum() > (side == 1).sum() or ((side == 0).sum() == (side == 1).sum() and side[0] == 0) \
            else 1
        group = self.store.fleet.get_group(gid)
        movers = [d for d, s in zip(devs, side, strict=True) if s != keep]
        new_gid = self.store.fleet.add_group(self.head_version(group), centers[1 - keep].tolist(),
                                             note=f"split from group {gid}")
        for d in movers:
            self.store.fleet.set_device_group(d.id, new_gid)
        self._refresh(gid)
        self._refresh(new_gid)
        return [f"group {gid} split ({far:.3f} apart): {', '.join(d.name for d in movers)} -> group {new_gid}"]

    def _merge_close(self) -> list[str]:
        changes = []
        while True:
            members = self.members()
            groups = [g for g in self.store.fleet.list_groups() if g.centroid is not None and members.get(g.id)]
            close = [(distance(a.centroid, b.centroid), a.id, b.id) for a, b in itertools.combinations(groups, 2)
                     if len(a.centroid) == len(b.centroid)]
            close = [c for c in close if c[0] <= self.cfg.merge_distance]
            if not close:
                return changes
            dist, a, b = min(close)
            keep, gone = (a, b) if len(members[a]) >= len(members[b]) else (b, a)
            for d in members[gone]:
                self.store.fleet.set_device_group(d.id, keep)
            self.store.fleet.update_group(gone, dissolve=True)
            self._refresh(keep)
            changes.append(f"group {gone} merged into group {keep} (centroids {dist:.3f} apart)")

    # ------------------------------------------------------------------ report
    def describe(self) -> list[dict]:
        """What ``cloud groups`` shows: per active group its members, current version and accuracy proxy (mean
        prediction entropy its members reported with their signatures)."""
        out = []
        members = self.members()
        for g in self.store.fleet.list_groups():
            devs = members.get(g.id, [])
            ents = [d.signature_entropy for d in devs if d.signature_entropy is not None]
            spread = max((distance(d.signature, g.centroid) for d in devs if d.signature and g.centroid), default=0.0)
            out.append({"id": g.id, "members": [d.name for d in devs], "version": self.head_version(g),
                        "target_version": self.store.target_version("", g.id),
                        "mean_entropy": round(float(np.mean(ents)), 4) if ents else None,
                        "spread": round(spread, 4), "base_version": g.base_version, "note": g.note,
                        "created": g.created})
        return out
