"""Cloud configuration: flags > environment (``EDGEADAPT_CLOUD_*``) > ``<home>/config.toml`` > defaults.

Environment names: ``EDGEADAPT_CLOUD_<FIELD>`` for top-level fields and ``EDGEADAPT_CLOUD_TRAINER__<FIELD>`` for
trainer fields (e.g. ``EDGEADAPT_CLOUD_LISTEN=0.0.0.0:8700``, ``EDGEADAPT_CLOUD_TRAINER__LR=0.001``). Values
that look like JSON objects/lists are parsed as JSON. ``EDGEADAPT_CLOUD_HOME`` names the home directory.
Everything is validated by pydantic; errors name the field and where its value came from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from edgeadapt.core.update_package import MODES
from edgeadapt.core.wire import MAX_BODY_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_FILE = "config.toml"
ADMIN_TOKEN_FILE = "admin_token"
ENV_PREFIX = "EDGEADAPT_CLOUD_"
DEFAULT_HOME = "~/.edgeadapt/cloud"


class ConfigError(ValueError):
    """Invalid cloud configuration (the message lists every problem)."""


class TrainerConfig(BaseModel, extra="forbid"):
    """CEMA distillation (DESIGN §7). Defaults are the published ones."""

    enabled: bool = Field(True, description="run the background training worker in the serve process")
    alpha: float = Field(3.0, ge=0, description="weight of the student entropy term")
    beta: float = Field(3.0, ge=0, description="weight of the KL(teacher || student) term")
    gamma: float = Field(1.0, ge=0, description="weight of the CE(student, teacher argmax) term")
    tau: float = Field(1.0, gt=0, description="distillation temperature")
    lr: float = Field(2.5e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    chunk: int = Field(32, ge=1, description="new uploads per step")
    replay_size: int = Field(10_000, ge=0, description="FIFO replay buffer capacity")
    replay_min: int = Field(256, ge=0, description="replay is mixed in once it holds this many")
    replay_per_step: int = Field(96, ge=0)
    input_cache_mb: float = Field(256.0, gt=0, description="uploaded inputs the cloud keeps in RAM at most (a "
                                  "least-recently-used cache of the store's blobs); replay stays on disk")
    steps_per_chunk: int = Field(2, ge=1, description="SGD steps per group of new uploads (chosen on the held-out dev "
                                                       "stream, see docs/NOTES.md)")
    epochs: int = Field(1, ge=1, description="passes over the pending uploads per training round")
    min_steps_per_round: int = Field(30, ge=0, description="more passes (fresh replay each) until a round has taken "
                                                          "this many steps: a device that uploads a third of its "
                                                          "traffic gets as many steps per round as one that uploads "
                                                          "all of it (0: off; 30 chosen on the dev stream, "
                                                          "docs/NOTES.md)")
    normalization: str = Field("batch", pattern="^(batch|running)$",
                               description="batch: each group of one device's consecutive uploads is normalized with "
                                           "its own statistics (as the devices do); running: one mixed batch, teacher "
                                           "and gate in eval mode")
    bn_momentum: float | None = Field(None, gt=0, le=1, description="override BatchNorm momentum (None: keep)")
    teacher_adapt: bool = Field(False, description="teacher adapts its norm affine by entropy minimization")
    teacher_lr: float = Field(2.5e-4, gt=0)
    train_every: int = Field(256, ge=1, description="train when this many new uploads are pending ...")
    train_interval_s: float = Field(60.0, gt=0, description="... or when uploads have waited this long")
    max_samples_per_round: int = Field(1024, ge=1, description="a background round that has fallen behind trains on "
                                                               "this many most recent uploads; older ones go to "
                                                               "replay untrained (admin train: no cap)")
    round_lease_s: float = Field(300.0, gt=0, description="a round holds its lineage's lease this long, renewed as "
                                 "it trains: replicas sharing a store train each lineage one at a time, and a "
                                 "worker that dies mid-round leaves its uploads to another once the lease expires")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="uploads held back for the gate, never trained")
    gate_samples: int = Field(2000, ge=1, description="most recent held-back uploads the gate evaluates")
    gate_tolerance: float = Field(0.0, ge=0, le=1, description="allowed drop in teacher agreement")
    device_share_max: float = Field(0.5, gt=0, le=1, description="when several devices contributed, no one device "
                                                                "makes up more than max(this, 1/n_devices) of a "
                                                                "round's training uploads or of the gate's holdout; "
                                                                "its excess uploads are left out (fleet poisoning)")
    gate_z: float = Field(1.64, ge=0, description="reject only a significant drop: paired (McNemar-style) z; 0 = any "
                                                 "drop beyond gate_tolerance")
    seed: int = 0
    torch_threads: int | None = Field(None, ge=1)
    executor: Literal["inprocess", "ray"] = Field("inprocess", description="where rounds run: inprocess (the "
                                                  "serve process's trainer thread) or ray (one Ray task per lineage "
                                                  "round, against the same store; needs edgeadapt[ray])")
    ray_address: str | None = Field(None, description="executor ray: None starts a local Ray (2 CPUs at most); "
                                    "\"auto\" joins the running cluster, \"ray://HOST:PORT\" a remote one")
    ray_num_gpus: float = Field(0.0, ge=0, description="executor ray: the GPU fraction each round's task asks for "
                                "when the cluster has GPUs (0 or no GPUs: CPU tasks)")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, v: str | None) -> str | None:
        if v and v != "auto" and not v.startswith("ray://") and ":" not in v:
            raise ValueError(f"ray_address must be \"auto\", ray://HOST:PORT or HOST:PORT, not {v!r}")
        return v or None


class GroupsConfig(BaseModel, extra="forbid"):
    """Groups of devices in similar domains, a lineage of versions per group (cloud/grouping.py). Distances are
    between domain signatures (~ RMS per-channel normalization shift), chosen on the dev stream
    (scripts/fleet_thresholds.py, 4 devices x 256 images per corruption): devices in one corruption lie 0.018
    apart (median; p90 0.03-0.05), devices in different corruptions 0.058 (p1) to 0.15 (median)."""

    enabled: bool = Field(False, description="group devices by their domain signatures and train one lineage per "
                                             "group (off: one global lineage, as before)")
    join_distance: float = Field(0.05, gt=0, description="a device joins the nearest group within this of its "
                                                         "centroid, or founds a new group")
    leave_distance: float = Field(0.1, gt=0, description="a member leaves its group when farther than this from its "
                                                          "centroid (hysteresis: >= join_distance)")
    split_distance: float = Field(0.15, gt=0, description="a group whose members lie farther apart than this is "
                                                         "split in two")
    merge_distance: float = Field(0.03, gt=0, description="two groups whose centroids come this close are merged")
    replay: Literal["own", "shared"] = Field("shared", description="what a group's round replays: shared (every "
                                             "group's past uploads) or own (its members' past uploads once they "
                                             "hold replay_min, else shared)")

    @model_validator(mode="after")
    def _ordered(self) -> GroupsConfig:
        if not self.merge_distance <= self.join_distance <= self.leave_distance:
            raise ValueError("groups: need merge_distance <= join_distance <= leave_distance")
        return self


class CloudConfig(BaseModel, extra="forbid"):
    listen: str = Field("127.0.0.1:8700", description="HOST:PORT")
    bundle: str | None = Field(None, description="the bundle the devices run")
    teacher: str | None = Field(None, description="reference arch name or package.module:factory")
    teacher_weights: str | None = Field(None, description=".safetensors (or .pt, loaded weights_only)")
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict)
    student_model: str | None = Field(None, description="builder of the bundle's architecture when the bundle names "
                                                        "an unregistered one: package.module:factory (the manifest's "
                                                        "arch is never imported by itself)")
    store_dir: str | None = Field(None, description="default: <home>/store (SQLite and, by default, blobs)")
    database_url: str | None = Field(None, description="PostgreSQL for the metadata, shared by every replica: "
                                                       "postgresql://USER:PASSWORD@HOST:PORT/DBNAME (unset: the "
                                                       "embedded SQLite store in store_dir)")
    blob_url: str | None = Field(None, description="where uploads, parameters and packages go: "
                                                   "s3://BUCKET/PREFIX (S3-compatible; credentials from the AWS_* "
                                                   "environment) or a directory (default: <store_dir>/blobs)")
    blob_endpoint_url: str | None = Field(None, description="the S3 endpoint of a non-AWS object store, e.g. "
                                                            "http://127.0.0.1:9000 (unset: AWS)")
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    update_mode: str = Field("int8", description=f"compression of served updates: one of {MODES}")
    update_opts: dict[str, Any] = Field(default_factory=dict, description="mode options, e.g. {density = 0.1}")
    auto_rollout: bool = Field(True, description="new gated versions go to all devices")
    long_poll_max_s: float = Field(30.0, ge=0, le=600, description="longest a device's update check may wait "
                                                                   "for a version (its `wait`)")
    long_poll_recheck_s: float = Field(2.0, gt=0, le=600, description="a waiting check is woken at once by a "
                                       "publish in this process; this often it also looks for one made by another "
                                       "replica")
    metrics_public: bool = Field(True, description="serve /metrics without a token")
    tls_cert: str | None = Field(None, description="PEM certificate (chain): serve HTTPS; without it the cloud "
                                                   "speaks plain HTTP and belongs behind a TLS proxy")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert (omit if tls_cert holds it)")
    max_connections: int = Field(1024, ge=16, description="open connections at most (fitted to the open-file "
                                                          "limit); past it the longest-waiting idle or half-sent "
                                                          "one is closed (core/netguard.py)")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="a request head must arrive within this")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="a request body must arrive within this")
    log_level: str = "info"
    device_stale_after_s: float = Field(600.0, gt=0, description="a device whose last heartbeat is older is listed "
                                        "as \"stale heartbeat\" by `cloud devices` and the admin API")
    min_free_disk_mb: float = Field(256.0, ge=0, description="less free space than this under the store makes the "
                                    "cloud report itself degraded")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    groups: GroupsConfig = Field(default_factory=GroupsConfig)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"listen must be HOST:PORT, not {v!r}")
        return v

    @model_validator(mode="after")
    def _tls(self) -> CloudConfig:
        if self.tls_key and not self.tls_cert:
            raise ValueError("tls_key needs tls_cert")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not Path(path).expanduser().is_file():
                raise ValueError(f"{name} {path} is not a file")
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str | None) -> str | None:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError("database_url must be postgresql://... (leave it unset for the embedded SQLite store)")
        return v or None

    @field_validator("blob_url")
    @classmethod
    def _blob_url(cls, v: str | None) -> str | None:
        if v and "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError(f"blob_url must be s3://BUCKET/PREFIX or a directory, not {v!r}")
        if v and v.startswith("s3://") and not v[5:].split("/", 1)[0]:
            raise ValueError(f"blob_url {v!r} names no bucket (s3://BUCKET/PREFIX)")
        return v or None

    @field_validator("update_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"update_mode must be one of {MODES}, not {v!r}")
        return v

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def net_limits(self):
        """The connection limits both servers enforce (``edgeadapt.core.netguard``)."""
        from edgeadapt.core.netguard import NetLimits

        return NetLimits(max_connections=self.max_connections, header_timeout_s=self.header_timeout_s,
                         body_timeout_s=self.body_timeout_s)

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def resolve_home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get(ENV_PREFIX + "HOME") or DEFAULT_HOME).expanduser()


def _env_layer(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "HOME" or key == ENV_PREFIX + "ADMIN_TOKEN":
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        value: Any = raw
        if raw[:1] in "[{":
            try:
                value = json.loads(raw)
            except ValueError:
                pass
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("teacher_kwargs", "update_opts"):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _flatten(d: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "trainer":
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def load_config(home: str | Path | None = None, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> CloudConfig:
    """Layered config. ``overrides`` (from flags) may use ``trainer`` as a nested dict; None values are ignored."""
    home_p = resolve_home(home)
    layers: list[tuple[str, dict]] = []
    path = home_p / CONFIG_FILE
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
        layers.append((str(path), data.get("cloud", data)))
    layers.append(("environment", _env_layer(dict(os.environ if environ is None else environ))))

    def _drop_none(d: dict) -> dict:
        return {k: (_drop_none(v) if isinstance(v, dict) and k == "trainer" else v) for k, v in d.items()
                if v is not None}

    layers.append(("command line", _drop_none(overrides or {})))
    merged: dict = {}
    origin: dict[tuple, str] = {}
    for name, layer in layers:
        merged = _merge(merged, layer)
        for key in _flatten(layer):
            origin[key] = name
    try:
        return CloudConfig.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            src = origin.get(loc) or origin.get(loc[:1]) or "defaults"
            lines.append(f"  {'.'.join(loc) or '(root)'}: {err['msg']} (from {src})")
        raise ConfigError("invalid cloud configuration:\n" + "\n".join(lines)) from None


DEFAULT_TOML = """\
# edgeadapt cloud configuration. Precedence: command-line flags > EDGEADAPT_CLOUD_* environment > this file.
[cloud]
listen = "127.0.0.1:8700"
# bundle = "/path/to/bundle"
# teacher = "resnet_teacher"            # or package.module:factory
# teacher_weights = "/path/to/teacher.safetensors"
update_mode = "int8"                    # fp32 | fp16 | int8 | int4 | ecq | ternary | bitmask_fp16
                                        # (int8: ~0.2 pt; int4: ~9x on adapter updates; sparse modes lose more)
auto_rollout = true                     # new gated versions go to all devices
max_body_bytes = 16777216
long_poll_max_s = 30
# long_poll_recheck_s = 2               # waiting checks also look for other replicas' publishes this often
# tls_cert = "/etc/edgeadapt/cloud.crt" # serve HTTPS (devices: --ca-file); without it put a TLS proxy in front
# tls_key = "/etc/edgeadapt/cloud.key"
# max_connections = 1024                # half-sent/idle connections past this are closed, oldest first
# header_timeout_s = 10                 # a request head (body: body_timeout_s = 60) must arrive within this
# database_url = "postgresql://edgeadapt:PASSWORD@db:5432/edgeadapt"  # shared metadata (default: SQLite)
# blob_url = "s3://edgeadapt/cloud"     # shared blobs, S3-compatible (default: <store_dir>/blobs)
# blob_endpoint_url = "http://minio:9000"  # a non-AWS object store

[cloud.update_opts]                     # options of the update mode
# density = 0.1                         # ternary / bitmask_fp16: fraction of entries kept
# clip = 1.0                            # int4: quantile of |delta| that sets the scale

[cloud.trainer]
enabled = true
train_every = 256                       # train when this many uploads are pending
train_interval_s = 60                   # ... or when they have waited this long
max_samples_per_round = 1024            # a round behind trains on the newest this many; older go to replay
# round_lease_s = 300                  # replicas on one store train each lineage one round at a time
# executor = "ray"                     # rounds as Ray tasks (pip install 'edgeadapt[ray]'); default inprocess
# ray_address = "auto"                  # a running Ray cluster (unset: a local Ray in this process)
holdout_fraction = 0.1                  # uploads held back for the gate
teacher_adapt = false
seed = 0
"""
