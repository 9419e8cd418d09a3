"""The distillation trainer (CEMA, DESIGN §7): uploads -> new versions of the adaptable tensors.

Per step, a batch of ``chunk`` (32) new uploads plus, once the replay FIFO holds ``replay_min`` (256),
``replay_per_step`` (96) replayed ones goes through the teacher (soft labels) and the student, and the student
minimizes

    L = α·mean(w_s·H(p_s)) + β·mean(w_t·τ²·KL(p_t ‖ p_s)) + γ·mean(w_t·CE(z_s, argmax z_t)),
    w = exp(E_max − H) (detached), w_s from the student's entropy, w_t from the teacher's, E_max = 0.4·ln C:
    the upload bound of the one reliability policy the devices select by (core/reliability.py),

with SGD (lr 2.5e-3, momentum 0.9) on the bundle's adaptable tensors only: norm affine parameters and adapter
weights train as parameters; everything else is frozen. Each group of new uploads gets ``steps_per_chunk`` (2)
steps, each with freshly drawn replay (chosen on a dev stream held out of the models' training, with devices
normalizing as below: 56.7% vs 56.0% for one step). A round keeps taking full passes over its uploads (fresh
replay each; uploads enter replay once) until it has taken ``min_steps_per_round`` (30) steps, so a device that
uploads a third of its traffic is trained on as hard as one that uploads all of it (dev stream: 59.9% vs 56.7%).

Normalization (``normalization = "batch"``, the default; a departure from a plain CEMA step): the devices
normalize with statistics of their *current* domain (the device's ``DEFAULT_METHOD``: each batch's own statistics
mixed into the first stage, recent class-balanced ones in the rest; an update does not replace them), so the
student is trained the same way.
Uploads are cut into groups of ``chunk`` consecutive samples of one device (one device's recent traffic: one
domain, mostly), and every group goes through the student *and the teacher* on its own, normalized with the
group's own batch statistics. A batch that mixed new and replayed uploads would normalize the current domain
with statistics of every domain seen so far, and the affine parameters trained under them would not fit the
device; the teacher's labels are also better with the group's statistics (dev stream: 65-66% vs 63% in eval
mode). The gate and the loss probes judge both versions the same way.
``normalization = "running"`` is the plain variant (one mixed batch; teacher, gate and probes in eval mode).
The student's adaptable BatchNorm layers update ``running_mean/var`` from the groups with the layer's momentum
(PyTorch's 0.1 unless ``bn_momentum`` overrides it); they are published as ``norm_stats`` and are what a device
that starts at this version begins from.

Held-back uploads (``holdout_fraction``, decided at ingest, never trained on) feed the gate: a candidate
whose argmax agrees with the teacher's less often than the current version's (minus ``gate_tolerance``) is
rejected (when the drop is significant, paired per sample: see ``Trainer.gate``), recorded in the store and not
published; the student then restarts from the published version. OOD-flagged ("novel") uploads are stored only.

No single device dominates (DESIGN §15, issue 22: one device's 2,048 uploads once made both a round and the
gate's holdout its own): when several devices contributed, each keeps at most a common number of its most
recent uploads such that none makes up more than ``max(device_share_max, 1/n)`` (0.5 by default) of a round's
training uploads or of the holdout the gate judges (``cap_device_share``). A round's excess uploads are left out
for good (split ``capped``: never trained on, never replayed). A fleet whose devices upload alike is untouched.
A round with a single contributor is not capped (a one-device fleet must train), but its gate still judges on
every device's recent held-back uploads.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeadapt.cloud.config import TrainerConfig
from edgeadapt.cloud.edge_model import apply_params, extract_params, rebuild_edge_model
from edgeadapt.cloud.store import RoundLost, Store, StoredSample, register_bundle
from edgeadapt.cloud.teacher_cache import TeacherLogitCache
from edgeadapt.core import bundle as B
from edgeadapt.core import param_bounds
from edgeadapt.core.input_codec import InputCodec
from edgeadapt.core.reliability import DEFAULT_RELIABILITY, ReliabilityPolicy
from edgeadapt.core.tensorfile import ParamSet, params_hash

log = logging.getLogger(__name__)

EVAL_BATCH = 256
LOSS_EVAL_MAX = 2048


def cema_loss(z_s: torch.Tensor, z_t: torch.Tensor, alpha: float = 3.0, beta: float = 3.0, gamma: float = 1.0,
              tau: float = 1.0, reduction: str = "mean",
              reliability: ReliabilityPolicy = DEFAULT_RELIABILITY) -> torch.Tensor:
    """CEMA's student loss for student logits ``z_s`` and teacher logits ``z_t`` (teacher is not differentiated).
    Each sample's terms are weighted by exp(E_max - H) with E_max the policy's upload bound: the entropy a sample
    had to be below to be uploaded is where its weight crosses 1."""
    z_t = z_t.detach()
    e_max = reliability.upload_bound(z_s.shape[1])
    logp_s = F.log_softmax(z_s, dim=1)
    h_s = -(logp_s.exp() * logp_s).sum(1)
    logp_t = F.log_softmax(z_t, dim=1)
    h_t = -(logp_t.exp() * logp_t).sum(1)
    w_s = torch.exp(e_max - h_s).detach()
    w_t = torch.exp(e_max - h_t).detach()
    lt_tau = F.log_softmax(z_t / tau, dim=1)
    kl = (lt_tau.exp() * (lt_tau - F.log_softmax(z_s / tau, dim=1))).sum(1) * tau * tau
    ce = F.cross_entropy(z_s, z_t.argmax(1), reduction="none")
    per = alpha * w_s * h_s + beta * w_t * kl + gamma * w_t * ce
    return per.mean() if reduction == "mean" else per


@contextmanager
def batch_statistics(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Every BatchNorm of ``model`` normalizes with the forward's own batch statistics; running statistics and
    modes are left as they were (momentum 0 keeps ``running_mean/var`` bit-identical)."""
    if not enabled:
        yield
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (training, momentum, tracked) in zip(bns, saved, strict=True):
            m.train(training)
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def sample_groups(samples: list, inputs: list, size: int) -> list[list]:
    """Cut uploads into groups of up to ``size`` consecutive samples of one device (arrival order kept):
    one device's recent traffic, i.e. (mostly) one domain, normalized together. ``inputs`` (one per sample): what
    the groups hold, the samples' arrays or the stored records themselves (the trainer's: inputs stay on disk)."""
    by_device: dict[int, list] = {}
    for smp, x in zip(samples, inputs, strict=True):
        by_device.setdefault(smp.device_id, []).append(x)
    groups = []
    for xs in by_device.values():
        n = max(1, math.ceil(len(xs) / size))
        step = math.ceil(len(xs) / n)  # near-equal groups: no tiny remainder with noisy batch statistics
        groups += [xs[i : i + step] for i in range(0, len(xs), step)]
    return groups


def device_cap(counts: list[int], share: float, total: int | None = None) -> int:
    """The largest per-device count ``c`` such that, keeping ``min(n_i, c)`` of each device's ``n_i`` samples, no
    device holds more than ``max(share, 1/n_devices)`` of what is kept (and, with ``total``, at most ``total``
    are kept). One device alone is not capped (all it has, up to ``total``)."""
    counts = [n for n in counts if n > 0]
    if not counts:
        return 0
    share = max(share, 1.0 / len(counts))
    lo, hi = 1, max(counts)

    def fits(c: int) -> bool:
        kept = sum(min(n, c) for n in counts)
        return c <= share * kept + 1e-9 and (total is None or kept <= total)
    if not fits(lo):
        return 0
    while lo < hi:  # the set of fitting caps is an interval [1, c*]: c/kept(c) only grows with c
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_device_share(samples: list, share: float, total: int | None = None) -> tuple[list, list]:
    """Split samples (oldest first) into (kept, left out): each device keeps its most recent ``device_cap``
    samples, so no single device makes up more than ``max(share, 1/n)`` of the kept ones when ``n`` devices
    contributed (a device uploading 2,048 samples against two devices' 128 each keeps 256 at ``share`` 0.5).
    Arrival order is kept."""
    by_device: dict[int, list] = {}
    for smp in samples:
        by_device.setdefault(smp.device_id, []).append(smp)
    cap = device_cap([len(v) for v in by_device.values()], share, total)
    keep = {id(x) for xs in by_device.values() for x in xs[max(0, len(xs) - cap):]}
    kept = [x for x in samples if id(x) in keep]
    return kept, [x for x in samples if id(x) not in keep]


def device_counts(samples: list) -> dict[str, int]:
    out: dict[str, int] = {}
    for smp in samples:
        out[str(smp.device_id)] = out.get(str(smp.device_id), 0) + 1
    return out


def lineage_pending(store: Store, grouper) -> tuple[dict, dict[int | None, list]]:
    """A grouping cloud's pending uploads by lineage (group id; None: devices in no group), global lineage first,
    and the groups' members. -> (members, pending)."""
    members = grouper.members()
    of = {d.id: gid for gid, devs in members.items() for d in devs}
    pending: dict[int | None, list] = {}
    for smp in store.pending_samples():
        pending.setdefault(of.get(smp.device_id), []).append(smp)
    return members, {g: pending[g] for g in sorted(pending, key=lambda g: (g is not None, g or 0))}


def rounds_due(store: Store, cfg: TrainerConfig) -> bool:
    """Time for a round: ``train_every`` uploads pending, or the oldest has waited ``train_interval_s``."""
    pending = store.count_samples("train", consumed=False)
    if pending == 0:
        return False
    if pending >= cfg.train_every:
        return True
    oldest = store.oldest_pending_time()
    return oldest is not None and time.time() - oldest >= cfg.train_interval_s


def to_float_batch(arrays: list[np.ndarray], manifest: B.BundleManifest) -> torch.Tensor:
    """Uploaded inputs (uint8 / float16, mixed) -> normalized float32 [N, *shape]."""
    codec = InputCodec(manifest.input)
    x = np.stack([codec.to_values(a) for a in arrays])  # mixed uint8 / float16 uploads: all in value units
    return torch.from_numpy(np.ascontiguousarray(codec.normalize(x), dtype=np.float32))


class SGD:
    """Plain SGD with momentum, same update as ``torch.optim.SGD`` (dampening 0, no Nesterov, no weight decay).

    Own implementation because constructing a torch optimizer imports torch's compiler stack (seconds per process)."""

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float = 0.0):
        self.params = list(params)
        self.lr, self.momentum = lr, momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = d.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(d)
                d = buf
            p.add_(d, alpha=-self.lr)


@dataclass
class GateResult:
    passed: bool
    current: float | None
    candidate: float | None
    n: int
    reason: str = ""
    by_device: dict = field(default_factory=dict)  # held-back uploads judged, per device id


@dataclass
class TrainResult:
    status: str  # published | rejected | idle
    base_version: int
    version: int | None = None
    candidate_id: int | None = None
    samples: int = 0
    skipped: int = 0  # older pending uploads a capped round sent to replay without training on them
    capped: int = 0  # pending uploads left out because their device exceeded its share of the round
    by_device: dict = field(default_factory=dict)  # uploads trained on, per device id
    steps: int = 0
    seconds: float = 0.0
    loss_before: float | None = None
    loss_after: float | None = None
    gate: dict = field(default_factory=dict)
    reason: str = ""
    params_hash: str | None = None
    group: int | None = None  # the group whose lineage this round trained (None: the global lineage)
    groups: list = field(default_factory=list)  # a grouping cloud's rounds, one per group with uploads
    regrouped: list = field(default_factory=list)  # splits and merges made before the rounds

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Owns the student (at the latest published version), the teacher and the replay buffer.

    ``train_now()`` trains on everything pending and gates/publishes synchronously; ``start()`` runs a background
    thread that calls it when ``train_every`` uploads are pending or the oldest has waited ``train_interval_s``.
    ``on_publish(version)`` is called after a version is published (the server uses it to wake long-polls).
    """

    executor = "inprocess"  # where rounds run (``trainer.executor``; "ray": cloud/ray_executor.py's RayRounds)

    def __init__(self, bundle_dir: str | Path, store: Store, teacher: nn.Module, config: TrainerConfig | None = None,
                 *, auto_rollout: bool = True, metrics=None, on_publish: Callable[[int], None] | None = None,
                 student_model: str | None = None, grouper=None, device: str = "cpu"):
        self.cfg = config or TrainerConfig()
        #: where the models compute: "cuda" in a Ray task given a GPU (cloud/ray_executor.py), else the CPU
        self.device = torch.device(device)
        #: groups of similar devices (cloud/grouping.py): one lineage (version, optimizer) per group, one shared
        #: replay buffer and teacher; None: the one global lineage
        self.grouper = grouper
        self._lineages: dict[int | None, tuple[int, SGD | None]] = {}
        self._group: int | None = None  # the lineage the student is in during a round
        #: who this worker is to the round leases of a shared store (replicas, restarts)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease: tuple[str, str] | None = None  # (lineage, holder) during a round
        self._lease_renewed = 0.0
        self._gate_devices: set[int] | None = None  # the devices whose held-back uploads judge this round
        self.bundle_dir = Path(bundle_dir)
        self.store = store
        self.metrics = metrics
        self.auto_rollout = auto_rollout
        self.on_publish = on_publish
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.manifest = register_bundle(store, bundle_dir)
        self.num_classes = self.manifest.num_classes
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: TrainResult | None = None
        # health (issue 20): the last failed round (time.time(), why) until a round succeeds, and counts
        self.last_error: tuple[float, str] | None = None
        self.last_success_at: float | None = None
        self.failures = 0
        torch.manual_seed(self.cfg.seed)
        self.rng = np.random.default_rng(self.cfg.seed)

        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher_opt = None
        if self.cfg.teacher_adapt:
            affine = [m for m in self.teacher.modules() if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm))]
            params = [p for m in affine for p in (m.weight, m.bias) if p is not None]
            for p in params:
                p.requires_grad_(True)
            if params:
                self.teacher_opt = SGD(params, lr=self.cfg.teacher_lr, momentum=self.cfg.momentum)
        # a frozen teacher's logits per upload, computed once (teacher_cache.py): every upload the trainer can
        # still draw (replay, a round's new ones and its loss probe, the gate's holdout) fits
        self.teacher_cache = TeacherLogitCache(0 if self.teacher_opt is not None else
                                               self.cfg.replay_size + self.cfg.gate_samples
                                               + self.cfg.max_samples_per_round + LOSS_EVAL_MAX)

        self.version = int(store.latest_version())
        # the bundle's arch from the registry, or the operator's --student-model: never imported from the manifest
        self.student = rebuild_edge_model(self.bundle_dir, store.get_params(self.version), student_model).to(self.device)
        self.trainable = self._configure_student(self.student)
        self.optimizer = self._new_optimizer()
        self.evaluator = rebuild_edge_model(self.bundle_dir, store.get_params(self.version),
                                            student_model).to(self.device).eval()
        # replay: groups of past uploads (see sample_groups), at most replay_size samples in all, as the store's
        # records: their inputs stay in its blobs and a step loads the ones it draws (through the store's cache,
        # bounded in bytes), so what the trainer holds in RAM does not grow with the replay size or resolution
        self.replay: deque[list[StoredSample]] = deque()
        self.replay_samples = 0
        store.samples.input_cache.resize(int(self.cfg.input_cache_mb * 2**20))
        if self.cfg.replay_size > 0:
            old = store.recent_samples("train", self.cfg.replay_size, consumed=True)
            for g in sample_groups(old, old, self.cfg.chunk):
                self._remember(g)

    # ------------------------------------------------------------------ setup
    def _configure_student(self, model: nn.Module) -> list[nn.Parameter]:
        names = {t.name: t.kind for t in self.manifest.adaptable}
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = []
        for pname, p in model.named_parameters():
            if names.get(pname) in ("norm_affine", "adapter"):
                p.requires_grad_(True)
                trainable.append(p)
        self._stat_modules = []
        for mname, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and names.get(f"{mname}.running_mean") == "norm_stats":
                if self.cfg.bn_momentum is not None:
                    m.momentum = self.cfg.bn_momentum
                self._stat_modules.append(m)
        return trainable

    def _train_mode(self) -> None:
        self.student.eval()
        for m in self._stat_modules:
            m.train()

    def _new_optimizer(self) -> SGD | None:
        if not self.trainable:
            return None
        return SGD(self.trainable, lr=self.cfg.lr, momentum=self.cfg.momentum)

    @property
    def _per_group(self) -> bool:
        return self.cfg.normalization == "batch"

    def _remember(self, group: list[StoredSample]) -> None:
        self.replay.append(group)
        self.replay_samples += len(group)
        while self.replay_samples > self.cfg.replay_size and len(self.replay) > 1:
            self.replay_samples -= len(self.replay.popleft())

    def _replay_groups(self) -> list[list[StoredSample]]:
        """About ``replay_per_step`` replayed samples, as whole groups drawn at random."""
        if self.cfg.replay_size <= 0 or self.cfg.replay_per_step <= 0 or not self.replay \
                or self.replay_samples < max(1, self.cfg.replay_min):
            return []
        k = min(len(self.replay), max(1, round(self.cfg.replay_per_step / self.cfg.chunk)))
        pool = self._own_replay()
        if pool is not None:
            return [self.replay[pool[j]] for j in self.rng.choice(len(pool), size=min(k, len(pool)), replace=False)]
        return [self.replay[j] for j in self.rng.choice(len(self.replay), size=k, replace=False)]

    def _own_replay(self) -> list[int] | None:
        """In a group's round with ``groups.replay = "own"``: the replay entries of the group's own devices, once
        they hold ``replay_min`` samples (a lineage specializes on its domain); None: draw from the shared buffer
        (every group's uploads: a small or new group still learns)."""
        if self._group is None or self._gate_devices is None or getattr(self.grouper.cfg, "replay", "") != "own":
            return None
        own = [j for j, g in enumerate(self.replay) if g and g[0].device_id in self._gate_devices]
        return own if own and sum(len(self.replay[j]) for j in own) >= max(1, self.cfg.replay_min) else None

    # ------------------------------------------------------------------ pieces
    def _teacher_logits(self, x: torch.Tensor, adapt: bool = False) -> torch.Tensor:
        with batch_statistics(self.teacher, self._per_group):
            return self._teacher_forward(x, adapt)

    def _teacher_forward(self, x: torch.Tensor, adapt: bool) -> torch.Tensor:
        if adapt and self.teacher_opt is not None:
            z = self.teacher(x)
            logp = F.log_softmax(z, 1)
            ent = -(logp.exp() * logp).sum(1).mean()
            self.teacher_opt.zero_grad(set_to_none=True)
            ent.backward()
            self.teacher_opt.step()
            return z.detach()
        with torch.no_grad():
            return self.teacher(x)

    def _batch(self, items: list) -> torch.Tensor:
        """Normalized inputs of stored uploads (loaded from the store now) or of arrays."""
        if items and isinstance(items[0], StoredSample):
            items = self.store.load_inputs(items)
        return to_float_batch(items, self.manifest).to(self.device)

    def _teacher_group(self, group: list) -> torch.Tensor:
        """The teacher's logits for one group, normalized as the trainer normalizes, kept per upload."""
        return self.teacher_cache.logits(group, lambda g: self._logits(self.teacher, [list(g)]))

    def _teacher_out(self, inputs: list | list[list]) -> torch.Tensor:
        """The teacher's logits for plain inputs or groups (as ``_logits``); groups of stored uploads through the
        cache (in eval mode, ``normalization = "running"``, per-group logits concatenated are the flat ones)."""
        if inputs and isinstance(inputs[0], list) and self.teacher_opt is None:
            return torch.cat([self._teacher_group(g) for g in inputs])
        return self._logits(self.teacher, inputs)

    def _step(self, groups: list[list[StoredSample]]) -> float:
        z_t = torch.cat([self._teacher_group(g) for g in groups]) if self.teacher_opt is None else None
        if not self._per_group:  # one mixed batch (in the same order as the groups' teacher logits)
            groups = [[x for g in groups for x in g]]
        xs = [self._batch(g) for g in groups]
        if z_t is None:  # an adapting teacher: its own entropy step on these very batches
            z_t = torch.cat([self._teacher_logits(x, adapt=True) for x in xs])
        self._train_mode()
        z_s = torch.cat([self.student(x) for x in xs])
        loss = cema_loss(z_s, z_t, self.cfg.alpha, self.cfg.beta, self.cfg.gamma, self.cfg.tau)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        else:  # statistics only
            loss = loss.detach()
        self.student.eval()
        return float(loss.detach())

    def _logits(self, model: nn.Module, inputs: list | list[list]) -> torch.Tensor:
        """Logits for plain inputs (eval mode, in slices) or for groups (each normalized with its own batch
        statistics under ``normalization = "batch"``; eval mode otherwise). Inputs: arrays or stored uploads
        (loaded a slice or a group at a time)."""
        model.eval()
        grouped = bool(inputs) and isinstance(inputs[0], list)
        if grouped and self._per_group:
            parts = inputs
        else:
            flat = [x for g in inputs for x in g] if grouped else inputs
            parts = [flat[i : i + EVAL_BATCH] for i in range(0, len(flat), EVAL_BATCH)]
        outs = []
        with torch.no_grad(), batch_statistics(model, grouped and self._per_group):
            for part in parts:
                outs.append(model(self._batch(part)))
        return torch.cat(outs) if outs else torch.zeros(0, self.num_classes, device=self.device)

    def distill_loss(self, params: ParamSet, inputs: list | list[list]) -> float:
        """The CEMA loss of the student with ``params`` against the current teacher on ``inputs`` (plain inputs:
        eval mode; groups: normalized as the trainer normalizes, see the module docstring)."""
        if not inputs:
            return float("nan")
        apply_params(self.evaluator, params)
        z_s = self._logits(self.evaluator, inputs)
        z_t = self._teacher_out(inputs)
        return float(cema_loss(z_s, z_t, self.cfg.alpha, self.cfg.beta, self.cfg.gamma, self.cfg.tau))

    def _agrees(self, params: ParamSet, inputs, teacher_pred: torch.Tensor) -> np.ndarray:
        apply_params(self.evaluator, params)
        return (self._logits(self.evaluator, inputs).argmax(1) == teacher_pred).cpu().numpy()

    def agreement(self, params: ParamSet, inputs, teacher_pred: torch.Tensor | None = None) -> float:
        """Fraction of ``inputs`` (plain or groups) on which the student with ``params`` predicts the teacher's
        class."""
        if teacher_pred is None:
            teacher_pred = self._teacher_out(inputs).argmax(1)
        return float(self._agrees(params, inputs, teacher_pred).mean()) if inputs else float("nan")

    def gate(self, candidate: ParamSet, current: ParamSet | None = None) -> GateResult:
        """Teacher agreement of candidate vs current (latest published) on held-back uploads.

        Rejects when the candidate agrees less by more than ``gate_tolerance`` and, paired per sample, the drop
        is significant: (b − c) > gate_z·sqrt(b + c), b / c = samples only the current / only the candidate
        gets right (with gate_z = 0 any drop beyond the tolerance rejects)."""
        # no device dominates the holdout: each contributes its most recent uploads up to a common cap
        # (device_share_max), so a device that floods the cloud cannot make the gate judge on its own uploads
        recent = self.store.recent_samples_per_device("holdout", self.cfg.gate_samples)
        if self._gate_devices is not None:  # a group's round is judged on its own members' uploads
            recent = [s for s in recent if s.device_id in self._gate_devices]
        held, _ = cap_device_share(recent, self.cfg.device_share_max, self.cfg.gate_samples)
        if not held:
            return GateResult(True, None, None, 0, "no held-back samples yet: gate skipped")
        inputs = sample_groups(held, held, self.cfg.chunk)
        if current is None:
            current = self.store.get_params(self.version)
        t_pred = self._teacher_out(inputs).argmax(1)
        a_cur = self._agrees(current, inputs, t_pred)
        a_cand = self._agrees(candidate, inputs, t_pred)
        n = len(held)
        cur, cand = float(a_cur.mean()), float(a_cand.mean())
        b, c = int((a_cur & ~a_cand).sum()), int((a_cand & ~a_cur).sum())
        worse = (b - c) > self.cfg.gate_tolerance * n and (b - c) > self.cfg.gate_z * math.sqrt(b + c)
        by_device = device_counts(held)
        if worse:
            return GateResult(False, cur, cand, n,
                              f"teacher agreement on {n} held-back uploads fell from {cur:.4f} to {cand:.4f} "
                              f"({b} samples lost, {c} gained)", by_device)
        return GateResult(True, cur, cand, n, "", by_device)

    # ------------------------------------------------------------------ public
    def train_now(self, limit: int | None = None) -> TrainResult:
        """Train on every pending upload, then gate and publish or reject. Synchronous.

        With ``limit``, a round that has fallen behind trains on the ``limit`` most recent uploads only: they are
        the devices' current traffic, which the next version must fit. The older ones go to replay untrained
        and are marked consumed with the round, so a backlog never makes rounds longer and updates staler.

        A grouping cloud (``grouper``) regroups first, then trains one round per group that has uploads, each in
        its group's lineage (uploads of devices in no group: the global lineage); the result sums them up
        (``groups``: each round's result)."""
        if self.grouper is None:
            return self.train_lineage(None, limit)
        with self._lock:
            regrouped = self.grouper.regroup()
            members, pending = lineage_pending(self.store, self.grouper)
            results = [self._lineage_round(gid, samples, members, limit) for gid, samples in pending.items()]
        return self._summary(results, regrouped)

    def train_lineage(self, group: int | None, limit: int | None = None) -> TrainResult:
        """One round of one lineage (``group``; None: the global one) on what it has pending now: the work of one
        Ray task (cloud/ray_executor.py), whose scheduler regrouped and chose the lineage."""
        with self._lock:
            if self.grouper is None:
                if group is not None:
                    raise ValueError(f"group {group}: this cloud does not group devices")
                self._follow_store()
                return self._round(self.store.pending_samples(), limit)
            members, pending = lineage_pending(self.store, self.grouper)
            return self._lineage_round(group, pending.get(group, []), members, limit)

    def _lineage_round(self, group: int | None, samples: list, members: dict, limit: int | None) -> TrainResult:
        if not samples:  # nothing (left) to train, or a group merged away since the round was asked for
            return TrainResult("idle", self.version, reason="no pending uploads", group=group)
        devices = {d.id for d in members.get(group, [])} if group is not None else {s.device_id for s in samples}
        with self._in_lineage(group, devices):
            return self._round(samples, limit)

    @staticmethod
    def _summary(results: list[TrainResult], regrouped: list[str]) -> TrainResult:
        """One result for a grouping cloud's rounds: published if any round published, else rejected if any was."""
        if not results:
            return TrainResult("idle", 0, reason="no pending uploads", regrouped=regrouped)
        status = next((s for s in ("published", "rejected") if any(r.status == s for r in results)), "idle")
        main = next(r for r in results if r.status == status)
        return TrainResult(status, main.base_version, main.version, main.candidate_id,
                           samples=sum(r.samples for r in results), skipped=sum(r.skipped for r in results),
                           capped=sum(r.capped for r in results), steps=sum(r.steps for r in results),
                           seconds=sum(r.seconds for r in results), reason=main.reason, group=main.group,
                           groups=[r.to_dict() for r in results], regrouped=regrouped)

    @contextmanager
    def _in_lineage(self, group: int | None, devices: set[int]) -> Iterator[None]:
        """The student, version and optimizer of one lineage for a round (a group's: at its newest version, or
        the version it started from), judged on ``devices``' held-back uploads; the global lineage after."""
        if group is None:
            head = self.store.versions.latest_in_lineage(None)
            head = 0 if head is None else int(head)
        else:
            head = self.grouper.head_version(self.store.fleet.get_group(group))
        version, optimizer = self._lineages.get(group, (None, None))
        if version != head:  # new lineage, or moved on by another process (a handoff, a revert): restart there
            version, optimizer = head, self._new_optimizer()
        saved = (self.version, self.optimizer)
        self.version, self.optimizer, self._group, self._gate_devices = version, optimizer, group, devices
        apply_params(self.student, self.store.get_params(version))
        try:
            yield
        finally:
            self._lineages[group] = (self.version, self.optimizer)
            self.version, self.optimizer = saved
            self._group, self._gate_devices = None, None
            apply_params(self.student, self.store.get_params(self.version))

    def _round(self, pending: list, limit: int | None) -> TrainResult:
        """One training round on ``pending`` in the current lineage (see ``train_now``), under the lineage's lease:
        with replicas on one store, one round per lineage at a time and each upload trained once."""
        if not pending:
            return TrainResult("idle", self.version, reason="no pending uploads")
        lineage = "global" if self._group is None else f"group:{self._group}"
        with self._lock:
            if not self.store.claim_round(lineage, self.holder, self.cfg.round_lease_s):
                return TrainResult("idle", self.version, reason=f"another worker is training {lineage}",
                                   group=self._group)
            self._lease, self._lease_renewed = (lineage, self.holder), time.monotonic()
            try:
                # what another worker trained while this one waited is no longer pending, and its version is the
                # base now
                still = {s.seq for s in self.store.pending_samples()}
                pending = [s for s in pending if s.seq in still]
                if self._group is None:
                    self._follow_store()
                return self._leased_round(pending, limit)
            except RoundLost as exc:
                log.warning("training round abandoned: %s", exc)
                self._reset_student()
                return TrainResult("idle", self.version, reason=str(exc), group=self._group)
            finally:
                self._lease = None
                self.store.release_round(lineage, self.holder)

    def _renew_lease(self) -> None:
        """Keep the round's lease while it trains (every third of its length); lost: abandon the round."""
        if self._lease is None or time.monotonic() - self._lease_renewed < self.cfg.round_lease_s / 3:
            return
        if not self.store.claim_round(*self._lease, self.cfg.round_lease_s):
            raise RoundLost(f"the round lease on {self._lease[0]} expired and another worker took it")
        self._lease_renewed = time.monotonic()

    def _leased_round(self, pending: list, limit: int | None) -> TrainResult:
        with self._lock:
            t0 = time.perf_counter()
            base = self.version
            if not pending:
                return TrainResult("idle", base, reason="no pending uploads")
            # no device more than device_share_max of the round when several contributed; the excess is left
            # out (never trained on or replayed), so one device flooding the cloud cannot make the update its own
            pending, capped = cap_device_share(pending, self.cfg.device_share_max)
            skipped: list = []
            if limit is not None and len(pending) > limit:
                skipped, pending = pending[:-limit], pending[-limit:]
                pending, more = cap_device_share(pending, self.cfg.device_share_max)
                capped += more
            groups = sample_groups(pending, pending, self.cfg.chunk)
            if skipped and self.cfg.replay_size > 0:
                for g in sample_groups(skipped, skipped, self.cfg.chunk):
                    self._remember(g)
            base_params = self.store.get_params(base)
            probe, probe_n = [], 0
            for g in reversed(groups):  # the most recent uploads, up to LOSS_EVAL_MAX
                if probe_n >= LOSS_EVAL_MAX:
                    break
                probe.insert(0, g)
                probe_n += len(g)
            loss_before = self.distill_loss(base_params, probe)
            steps = 0
            losses = []
            epoch = 0
            while epoch < self.cfg.epochs or steps < self.cfg.min_steps_per_round:
                for new in groups:
                    for _ in range(self.cfg.steps_per_chunk):
                        self._renew_lease()
                        losses.append(self._step([new] + self._replay_groups()))
                        steps += 1
                    if epoch == 0 and self.cfg.replay_size > 0:
                        self._remember(new)
                epoch += 1
            candidate = extract_params(self.student, self.manifest)
            loss_after = self.distill_loss(candidate, probe)
            by_device = device_counts(pending)
            metrics = {"samples": len(pending), "skipped": len(skipped), "capped": len(capped),
                       "by_device": by_device, "steps": steps, "loss_before": loss_before,
                       "loss_after": loss_after, "train_loss_first": losses[0], "train_loss_last": losses[-1]}
            # the uploads are marked consumed in the same transaction that records the round's outcome
            result = self._decide(candidate, base, metrics, consumed=[s.seq for s in skipped + pending],
                                  capped=[s.seq for s in capped])
            result.samples, result.skipped, result.steps = len(pending), len(skipped), steps
            result.capped, result.by_device = len(capped), by_device
            result.loss_before, result.loss_after = loss_before, loss_after
            result.group = self._group
            result.seconds = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.train_seconds.observe(result.seconds)
                self.metrics.train_samples.inc(len(pending))
            self.last_result = result
            self.last_error, self.last_success_at = None, time.time()
            log.info("training round: %s (base v%d, %d uploads, %d older to replay, %d steps, loss %.4f -> %.4f, "
                     "%.1fs)%s%s", result.status, base, len(pending), len(skipped), steps, loss_before, loss_after,
                     result.seconds, f" -> v{result.version}" if result.version is not None else f": {result.reason}",
                     "" if self._group is None else f" [group {self._group}]")
            return result

    def submit_candidate(self, params: ParamSet, note: str = "submitted") -> TrainResult:
        """Gate an externally made candidate against the latest version and publish or reject it."""
        with self._lock:
            self._follow_store()
            return self._decide({k: np.asarray(v, np.float32) for k, v in params.items()}, self.version,
                                {"note": note})

    def _decide(self, candidate: ParamSet, base: int, metrics: dict, consumed: list[int] | None = None,
                capped: list[int] | None = None) -> TrainResult:
        phash = params_hash(candidate)
        # the bounds every device applies before it takes a version (core/param_bounds.py): publishing one that
        # devices would refuse only wastes a round and their downloads
        bad = param_bounds.violation(candidate, {t.name: t.kind for t in self.manifest.adaptable},
                                     self.store.get_params(0))
        if bad is not None:
            g = GateResult(False, None, None, 0, f"candidate out of bounds: {bad}")
        else:
            g = self.gate(candidate, self.store.get_params(base))
        metrics = {**metrics, "gate": asdict(g), **({"group": self._group} if self._group is not None else {})}
        if not g.passed:
            cid, _ = self.store.finish_round(base, phash, metrics, consumed or [], reason=g.reason, capped=capped,
                                             lease=self._lease)
            log.warning("candidate %d rejected by the gate: %s", cid, g.reason)
            if self.metrics is not None:
                self.metrics.versions_rejected.inc()
            self._reset_student()
            return TrainResult("rejected", base, None, cid, gate=asdict(g), reason=g.reason, params_hash=phash)
        # one transaction: a crash leaves either no trace of this round or all of it (version, rollout, record)
        cid, version = self.store.finish_round(base, phash, metrics, consumed or [], params=candidate,
                                               note=metrics.get("note", "trained"), rollout=self.auto_rollout,
                                               capped=capped, group_id=self._group, lease=self._lease)
        self.version = version
        apply_params(self.student, candidate)
        if self.metrics is not None:
            self.metrics.versions_published.inc()  # the latest version is read from the store at scrape
        if self.on_publish is not None:
            try:
                self.on_publish(version)
            except Exception:  # a listener must not break training
                log.exception("on_publish callback failed")
        return TrainResult("published", base, version, cid, gate=asdict(g), params_hash=phash)

    def _follow_store(self) -> None:
        """Continue from the newest version if another process published one (e.g. `cloud push --revert`)."""
        latest = self.store.latest_version()
        if latest is not None and latest > self.version:
            log.info("store has version %d (trainer was at %d): continuing from it", latest, self.version)
            self.version = int(latest)
            self._reset_student()

    def _reset_student(self) -> None:
        apply_params(self.student, self.store.get_params(self.version))
        self.optimizer = self._new_optimizer()

    # ------------------------------------------------------------------ background worker
    def notify(self) -> None:
        self._wake.set()

    def due(self) -> bool:
        return rounds_due(self.store, self.cfg)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(1.0, self.cfg.train_interval_s))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if self.due():
                    self.train_now(limit=self.cfg.max_samples_per_round)
            except Exception as exc:
                log.exception("training round failed; retrying later")
                self.failures += 1
                self.last_error = (time.time(), f"{type(exc).__name__}: {str(exc)[:200]}")
                if self.metrics is not None:
                    self.metrics.trainer_failures.inc()
                self._stop.wait(5.0)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="edgeadapt-trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
