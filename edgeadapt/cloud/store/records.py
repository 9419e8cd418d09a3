"""What the cloud store keeps, as plain records, and the errors its operations raise.

Tokens (devices, admin) are 32 random bytes, url-safe base64; only their sha256 is stored, compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import asdict, dataclass, field

import numpy as np


class StoreError(ValueError):
    """A store operation was refused (the message says why)."""


class NotFound(StoreError):
    pass


class RoundLost(StoreError):
    """A training round's lease on its lineage passed to another worker (this one was too slow or presumed dead):
    its outcome is not recorded, and the other worker trains those uploads."""


class StoreUnavailable(OSError):
    """The database or object store did not answer (connection lost, server down). An ``OSError`` so that the
    server answers 503 and the device keeps its queue, as for a full disk."""


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, digest: str) -> bool:
    return hmac.compare_digest(hash_token(token), digest)


# ------------------------------------------------------------------------------------------------ records
@dataclass
class Device:
    id: int
    name: str
    created: float
    revoked: float | None = None
    last_seen: float | None = None
    expires: float | None = None  # unix time after which the token is refused (None: never)
    version: int | None = None
    status: str | None = None
    counters: dict = field(default_factory=dict)
    problems: dict = field(default_factory=dict)  # the degraded reasons of its last heartbeat (cleaned strings)
    heartbeat_at: float | None = None  # when its last heartbeat arrived (last_seen: any request)
    signature: list[float] | None = None  # its latest domain signature (core/domain_signature.py)
    signature_at: float | None = None
    signature_entropy: float | None = None  # mean prediction entropy it reported with the signature
    group_id: int | None = None  # its group of similar devices (cloud/grouping.py), None: not grouped
    model: str = ""  # the registered model it runs ('' only while no model is registered)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NewSample:
    """One upload as the ingest endpoint hands it to the store."""

    sample_id: str
    input: np.ndarray
    logits: np.ndarray
    entropy: float
    ood_score: float
    novel: bool
    param_version: int
    split: str = "train"  # train | holdout | novel


@dataclass
class StoredSample:
    seq: int
    device_id: int
    sample_id: str
    split: str
    novel: bool
    param_version: int
    entropy: float
    ood_score: float
    blob: str
    row: int
    received: float


@dataclass
class VersionRecord:
    version: int
    params_hash: str
    parent: int | None
    created: float
    note: str
    metrics: dict
    group_id: int | None = None  # the group whose lineage it belongs to (None: the global lineage)
    model: str = ""  # versions are numbered per model


@dataclass
class DeviceGroup:
    """Devices of similar domains (cloud/grouping.py) with a lineage of versions of their own: it starts from
    ``base_version`` (what its founding devices ran) and grows by the rounds trained on its uploads."""

    id: int
    created: float
    base_version: int
    centroid: list[float] | None
    note: str
    dissolved: float | None = None


@dataclass
class CandidateRecord:
    id: int
    created: float
    base_version: int
    status: str  # published | rejected
    version: int | None
    params_hash: str
    reason: str
    metrics: dict
    model: str = ""


@dataclass
class ModelRecord:
    """A registered model (cloud/registry.py): its id is the bundle's model name, as devices report it; the bundle
    and the teacher that trains its devices' versions."""

    model: str
    bundle: str  # the bundle directory (every replica reads it at this path)
    teacher: str | None  # reference arch name or package.module:factory (None: uploads are stored only)
    teacher_weights: str | None
    teacher_kwargs: dict
    student_model: str | None  # builder of the bundle's architecture when it names an unregistered one
    input_shape: list[int]
    num_classes: int
    params_hash: str  # of its version 0 (the bundle's parameters)
    created: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Rollout:
    id: int
    version: int
    devices: list[str] | None
    fraction: float | None
    created: float
    note: str
    group_id: int | None = None  # a group's rollout: covers that group's members (whoever they are then)
    model: str = ""  # the model whose version it assigns (it covers that model's devices only)

    @property
    def scope(self) -> str:
        if self.group_id is not None:
            return f"group {self.group_id}"
        if self.devices is not None:
            return "devices: " + ",".join(self.devices)
        if self.fraction is not None and self.fraction < 1:
            return f"fraction {self.fraction:g}"
        return "all"

    def covers(self, device_name: str, group_id: int | None = None) -> bool:
        if self.group_id is not None:
            return self.group_id == group_id
        if self.devices is not None:
            return device_name in self.devices
        if self.fraction is None or self.fraction >= 1:
            return True
        return in_fraction(self.version, device_name, self.fraction)


def in_fraction(version: int, device_name: str, fraction: float) -> bool:
    """Deterministic membership: a staged rollout of one version grows monotonically with the fraction."""
    h = int.from_bytes(hashlib.sha256(f"{version}:{device_name}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction
