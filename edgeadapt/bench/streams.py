"""The wild-traffic settings as benchmark streams (DESIGN.md §12), all built from the same images.

A stream is the benchmark's images in some order (and, for ``gradual``, at other severities). Every setting is a
pure, seeded function of the base stream (images grouped by domain, in domain order), so the accuracy bench and
the loop rows see exactly the same sequence for a spec and a seed:

- ``continual``: the base stream (each domain's images in their own order, domains one after another).
- ``class-sorted``: within each domain, sorted by label (stable): batches hold one or two classes.
- ``correlated:DELTA``: within each domain, labels ordered by the Dirichlet procedure of NOTE / RoTTA
  (RoTTA's ``LabelDirichletDomainSequence``): with C classes and C time slots, each class's samples are split
  over the slots in proportions drawn from Dir(DELTA, ..., DELTA); each slot lists its class chunks in a random
  order, each chunk in stream order. Small DELTA (0.01) gives long single-class runs, DELTA = 0.1 runs of mixed
  length; a large DELTA gives class-balanced slots (each still lists its C class chunks one after another).
- ``mixed``: all domains interleaved (one seeded permutation of the whole stream).
- ``gradual``: within each domain the severity goes 1 -> 5 -> 1 (nine equal segments, severities 1 2 3 4 5 4 3
  2 1), the same images as the base stream; needs the companion file from ``build_gradual``.
- ``recurring:K``: the whole base sequence K times (long-horizon stability; ``pass_index`` says which pass).

``--limit N`` keeps the first N images of every domain before the ordering (``gradual`` takes every
(per_domain / N)-th image instead, so the limited stream still climbs to severity 5 and back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)
KINDS = ("continual", "class-sorted", "correlated", "mixed", "gradual", "recurring")


@dataclass
class Stream:
    """Images in benchmark order, with what each sample is: its label, domain, severity and pass."""

    spec: str
    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray  # int index into ``names``
    names: list[str]
    severity: np.ndarray | None = None
    pass_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        if len(self.pass_index) != len(self.y):
            self.pass_index = np.zeros(len(self.y), np.int64)

    @property
    def passes(self) -> int:
        return int(self.pass_index.max()) + 1 if len(self.pass_index) else 0

    def domain_names(self) -> np.ndarray:
        return np.array([self.names[d] for d in self.domain]) if self.names else self.domain


def parse_spec(spec: str) -> tuple[str, float | int | None]:
    """``"correlated:0.1"`` -> ``("correlated", 0.1)``; ``"recurring:5"`` -> ``("recurring", 5)``."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown stream {spec!r}: use continual, class-sorted, correlated:DELTA, mixed, gradual "
                         f"or recurring:K")
    if kind == "correlated":
        try:
            delta = float(arg)
        except ValueError:
            raise ValueError(f"stream {spec!r}: correlated needs a Dirichlet concentration, e.g. correlated:0.1") from None
        if not np.isfinite(delta) or delta <= 0:
            raise ValueError(f"stream {spec!r}: the concentration must be > 0")
        return kind, delta
    if kind == "recurring":
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"stream {spec!r}: recurring needs a pass count, e.g. recurring:5") from None
        if k < 1:
            raise ValueError(f"stream {spec!r}: the pass count must be >= 1")
        return kind, k
    if arg:
        raise ValueError(f"stream {spec!r}: {kind} takes no argument")
    return kind, None


def _segments(domain: np.ndarray) -> list[np.ndarray]:
    """Index arrays of the stream's domain segments, in stream order (a domain is one contiguous run)."""
    starts = np.flatnonzero(np.r_[True, domain[1:] != domain[:-1]])
    return np.split(np.arange(len(domain)), starts[1:])


def class_sorted_order(y: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """Within each domain segment, indices sorted by label (stable: equal labels keep their order)."""
    return np.concatenate([seg[np.argsort(y[seg], kind="stable")] for seg in _segments(domain)])


def dirichlet_slots(labels: np.ndarray, partition: np.ndarray, slot_orders: Sequence[np.ndarray],
                    num_classes: int) -> np.ndarray:
    """The order (positions into ``labels``) of one domain under given Dirichlet draws: ``partition[c]`` is class
    c's split over the slots (rows sum to 1), ``slot_orders[s]`` the order in which slot s lists its class chunks.
    Class c's samples (in stream order) are cut at ``floor(cumsum(partition[c])[:-1] * n_c)``."""
    slots: list[list[np.ndarray]] = [[] for _ in range(partition.shape[1])]
    for c in range(num_classes):
        ids = np.flatnonzero(labels == c)
        cuts = (np.cumsum(partition[c])[:-1] * len(ids)).astype(int)
        for s, chunk in enumerate(np.split(ids, cuts)):
            slots[s].append(chunk)
    out = [chunk for s, chunks in enumerate(slots) for chunk in (chunks[i] for i in slot_orders[s])]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def correlated_order(y: np.ndarray, domain: np.ndarray, delta: float, rng: np.random.Generator,
                     num_classes: int | None = None) -> np.ndarray:
    """NOTE / RoTTA's temporally correlated label order within each domain (C slots, Dir(delta) per class)."""
    c = int(num_classes or (int(y.max()) + 1 if len(y) else 0))
    order = []
    for seg in _segments(domain):
        partition = rng.dirichlet([delta] * c, c)
        slot_orders = [rng.permutation(c) for _ in range(c)]
        order.append(seg[dirichlet_slots(y[seg], partition, slot_orders, c)])
    return np.concatenate(order) if order else np.zeros(0, np.int64)


def gradual_severity(n: int, levels: Sequence[int] = GRADUAL_SEVERITIES) -> np.ndarray:
    """Severity of each of a domain's n positions: ``len(levels)`` near-equal segments, in order."""
    return np.asarray(levels, np.int64)[np.minimum(np.arange(n) * len(levels) // max(n, 1), len(levels) - 1)]


def _limit_prefix(idx: list[np.ndarray], limit: int | None) -> np.ndarray:
    return np.concatenate([seg[:limit] if limit else seg for seg in idx])


def _limit_stride(idx: list[np.ndarray], limit: int | None) -> np.ndarray:
    if not limit:
        return np.concatenate(idx)
    out = []
    for seg in idx:
        take = np.unique(np.linspace(0, len(seg) - 1, min(limit, len(seg))).round().astype(int))
        out.append(seg[take])
    return np.concatenate(out)


def build_stream(spec: str, x: np.ndarray, y: np.ndarray, domain: np.ndarray, names: Sequence[str] | None = None,
                 seed: int = 0, limit: int | None = None, gradual: dict | None = None,
                 num_classes: int | None = None) -> Stream:
    """The stream ``spec`` from the base stream (x, y, domain in domain order). ``gradual``: the companion arrays
    (``x``, ``severity``, aligned with the base stream) for ``spec == "gradual"``."""
    kind, arg = parse_spec(spec)
    names = list(names) if names is not None else [str(d) for d in range(int(domain.max()) + 1 if len(domain) else 0)]
    segs = _segments(domain)
    rng = np.random.default_rng(seed)
    severity = None
    if kind == "gradual":
        if gradual is None:
            raise ValueError("the gradual stream needs its companion file (build_gradual)")
        if len(gradual["x"]) != len(x):
            raise ValueError(f"gradual companion has {len(gradual['x'])} images, the base stream {len(x)}")
        keep = _limit_stride(segs, limit)
        x, severity = gradual["x"], np.asarray(gradual["severity"], np.int64)[keep]
        return Stream(spec, x[keep], y[keep], domain[keep], names, severity)
    keep = _limit_prefix(segs, limit)
    x, y, domain = x[keep], y[keep], domain[keep]
    if kind == "continual":
        order = np.arange(len(y))
    elif kind == "class-sorted":
        order = class_sorted_order(y, domain)
    elif kind == "correlated":
        order = correlated_order(y, domain, float(arg), rng, num_classes)  # type: ignore[arg-type]
    elif kind == "mixed":
        order = rng.permutation(len(y))
    else:  # recurring
        k = int(arg)  # type: ignore[arg-type]
        order = np.tile(np.arange(len(y)), k)
        passes = np.repeat(np.arange(k, dtype=np.int64), len(y))
        return Stream(spec, x[order], y[order], domain[order], names, severity, passes)
    return Stream(spec, x[order], y[order], domain[order], names, severity)


def gradual_path(stream_path: str | Path) -> Path:
    """Where the gradual companion of a stream file lives (next to it)."""
    p = Path(stream_path)
    return p.with_name(p.stem + ".gradual.npz")


def build_gradual(stream_path: str | Path, clean_x: np.ndarray, seed: int,
                  corrupt: Callable[[tuple], np.ndarray] | None = None, out: str | Path | None = None,
                  progress: Callable[[int], None] | None = None) -> Path:
    """Write (once) the gradual companion of the stream at ``stream_path``: the same images, each domain's
    positions at ``gradual_severity``; severity-5 positions are the stream's own images, the others corrupted
    from ``clean_x`` (the domain's clean images, in the stream's order) with seeds (``seed``, corruption,
    1000 + segment). Deterministic; returns its path."""
    from edgeadapt.datasets.fmnist import _atomic_savez, _corrupt_chunk, load_stream

    path = Path(out) if out is not None else gradual_path(stream_path)
    if path.is_file():
        return path
    corrupt = corrupt or _corrupt_chunk
    data = load_stream(stream_path)
    x, dom, names = data["x"], data["corruption"], data["corruption_names"]
    xg = x.copy()
    sev = np.full(len(x), 5, np.int64)
    for seg in _segments(dom):
        name = names[int(dom[seg[0]])]
        if len(seg) > len(clean_x):
            raise ValueError(f"{name}: {len(seg)} stream images but only {len(clean_x)} clean images")
        s = gradual_severity(len(seg))
        sev[seg] = s
        bounds = np.flatnonzero(np.r_[True, s[1:] != s[:-1], True])
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if s[a] == 5:
                continue
            xg[seg[a:b]] = corrupt((name, int(s[a]), seed, 1000 + j, clean_x[a:b]))
            if progress:
                progress(b - a)
    _atomic_savez(path, x=xg, severity=sev)
    return path


def load_gradual(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as d:
        return {"x": d["x"], "severity": d["severity"]}
