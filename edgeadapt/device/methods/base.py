"""The interface every forward-only adaptation method implements (numpy only, no torch).

The runtime calls, per batch of N samples (see DESIGN.md §4):

1. ``forward_stats()`` -> ``{layer: (mean[C], var[C])}`` for every BatchNorm layer: the statistics to
   predict this batch with. The runtime folds them into its static session and rebuilds that session
   only when ``stats_version`` changes.
2. ``forward_mix(n)`` -> ``np.ndarray[L] | None``: per-layer weight w of the batch's own statistics
   (mean = (1-w)*given + w*batch_mean, same for var). ``None`` = use ``forward_stats`` only (static path).
3. the graph runs: logits [N,C], penultimate features [N,D] and, when ``needs_stats``, per-layer statistics
   of a subset of reliable samples (computed while normalizing with ``forward_stats``).
4. ``update_stats(batch_stats, n_reliable, batch_info)`` (only when ``needs_stats`` and n_reliable > 0).
   A method with ``owns_stats_inputs`` chooses instead which inputs the statistics come from:
   ``stats_inputs(x, batch_info)`` -> ``(inputs, mix) | None`` (e.g. a class-balanced memory of earlier inputs);
   the runtime computes their statistics through the adaptive graph (with the given in-batch mix) and passes
   them to ``update_stats`` behind the same plausibility guard.
5. ``adjust(logits, features, batch_info)`` -> logits / log-probabilities [N,C] used for the prediction.

State is a flat ``dict[str, np.ndarray]`` (safetensors-friendly); ``load_state_dict`` validates names and
shapes and raises ``ValueError`` on any mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgeadapt.core.bundle import NormLayer
from edgeadapt.core.mathops import entropy_from_logits

Stats = dict[str, tuple[np.ndarray, np.ndarray]]
StatsRequest = tuple[np.ndarray, np.ndarray | None]  # (prepared inputs, per-layer in-batch mix)


@dataclass
class AdaptContext:
    """What a method may know about the model: normalization layers, source statistics, the linear head."""

    num_classes: int
    norm_layers: list[NormLayer]
    source_stats: Stats
    head_weight: np.ndarray | None = None  # [C, D]
    head_bias: np.ndarray | None = None  # [C]
    feature_mean: np.ndarray | None = None  # [D] source penultimate-feature mean
    feature_var: np.ndarray | None = None  # [D]
    entropy_mean: float | None = None  # mean prediction entropy (nats) on clean data

    def __post_init__(self) -> None:
        names = [nl.name for nl in self.norm_layers]
        if len(set(names)) != len(names):
            raise ValueError("duplicate normalization layer names")
        missing = set(names) - set(self.source_stats)
        extra = set(self.source_stats) - set(names)
        if missing or extra:
            raise ValueError(f"source_stats do not match norm_layers: missing {sorted(missing)}, extra {sorted(extra)}")
        for nl in self.norm_layers:
            mean, var = self.source_stats[nl.name]
            if np.shape(mean) != (nl.channels,) or np.shape(var) != (nl.channels,):
                raise ValueError(
                    f"source stats of {nl.name}: shapes {np.shape(mean)}, {np.shape(var)}, expected ({nl.channels},)"
                )
        if self.head_weight is not None:
            c = np.shape(self.head_weight)[0]
            if c != self.num_classes or np.ndim(self.head_weight) != 2:
                raise ValueError(f"head_weight shape {np.shape(self.head_weight)}, expected [{self.num_classes}, D]")
            if self.head_bias is not None and np.shape(self.head_bias) != (c,):
                raise ValueError(f"head_bias shape {np.shape(self.head_bias)}, expected ({c},)")
            d = np.shape(self.head_weight)[1]
            for key in ("feature_mean", "feature_var"):
                v = getattr(self, key)
                if v is not None and np.shape(v) != (d,):
                    raise ValueError(f"{key} shape {np.shape(v)}, expected ({d},)")

    @property
    def feature_dim(self) -> int | None:
        return None if self.head_weight is None else int(np.shape(self.head_weight)[1])

    def require(self, *fields: str, method: str = "") -> None:
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"method {method!r} needs {', '.join(missing)} in its AdaptContext")


@dataclass
class BatchInfo:
    """Per-sample facts about the batch, from the runtime."""

    reliable: np.ndarray  # bool [N]: not OOD and entropy below the runtime's threshold
    ood: np.ndarray  # bool [N]
    entropy: np.ndarray  # [N] nats
    logits: np.ndarray | None = None  # optional raw graph logits [N,C] (lets a composite run its guard early)
    batch_stats: Stats | None = None  # the prediction forward's own batch statistics, when it computed them and
    #                                   the runtime's guard found them plausible (``owns_stats_inputs`` methods)

    @classmethod
    def from_logits(cls, logits: np.ndarray, reliable: np.ndarray | None = None) -> BatchInfo:
        """Convenience (tests, offline replay): no OOD, every sample reliable unless given."""
        n = len(logits)
        rel = np.ones(n, bool) if reliable is None else np.asarray(reliable, bool)
        return cls(reliable=rel, ood=np.zeros(n, bool), entropy=entropy_from_logits(logits), logits=logits)


def parse_value(text: str) -> Any:
    """Option value from a spec string: bool, None, int, float, else the string itself."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """Cast an option to its default's type (int given for a float option is fine; bools are strict)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, str):
            parsed = parse_value(value)
            if isinstance(parsed, bool):
                return parsed
    elif isinstance(default, int):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ValueError(f"{name}: option {key}={value!r} must be {type(default).__name__}")


class AdaptationMethod:
    """Base class (not instantiable itself): the source model (no adaptation) unless a hook is overridden.

    Subclasses set ``name``, ``needs_stats``, ``provides_stats`` (the method owns the normalization
    statistics / mix, at most one per composite) and ``defaults`` (the accepted options and their defaults),
    override hooks and ``reset`` (call ``super().reset()``), and ``_state`` / ``_set_state``.
    """

    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = False
    provides_stats: ClassVar[bool] = False
    owns_stats_inputs: ClassVar[bool] = False
    is_guard: ClassVar[bool] = False  # a label-skew guard: a composite takes at most one and asks it per batch
    refresh_every: ClassVar[int | None] = None  # batches between refolds of moved statistics (None: the runtime's)
    #: the method mixes in-batch statistics only every few batches (``forward_mix`` None in between) and the batches
    #: in between are normalized with the last in-batch mix, folded into the fast session (device/engine.py)
    folds_mix: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, ctx: AdaptContext, **options: Any):
        if type(self) is AdaptationMethod:
            raise TypeError("AdaptationMethod is a base class; use a registered method (e.g. 'none')")
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(f"method {self.name!r}: unknown option(s) {', '.join(unknown)}; valid options: {valid}")
        opts = dict(self.defaults)
        for k, v in options.items():
            opts[k] = _coerce(self.name, k, v, self.defaults[k])
        self.ctx = ctx
        self.options: dict[str, Any] = opts
        self.layer_names = [nl.name for nl in ctx.norm_layers]
        self._source: Stats = {
            k: (np.asarray(m, np.float64).copy(), np.asarray(v, np.float64).copy()) for k, (m, v) in ctx.source_stats.items()
        }
        self._source32: Stats = {
            k: (m.astype(np.float32), v.astype(np.float32)) for k, (m, v) in self._source.items()
        }
        self._stats_version = 0
        self._validate()
        self.reset()

    # -- options ----------------------------------------------------------------------------------
    def _validate(self) -> None:
        """Check option values (raise ValueError)."""

    def _check(self, ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"method {self.name!r}: {message}")

    # -- the five hooks ---------------------------------------------------------------------------
    def forward_stats(self) -> Stats:
        """Normalization statistics to predict with (float32). Default: the source statistics."""
        return self._source32

    def forward_mix(self, n: int) -> np.ndarray | None:
        """Per-layer weight of the batch's own statistics, or None (static path). Default: None."""
        return None

    def update_stats(self, batch_stats: Stats, n_reliable: int, batch_info: BatchInfo | None = None) -> None:
        """Observe statistics of the batch's reliable subset. Default: no-op."""

    def stats_inputs(self, x: np.ndarray, batch_info: BatchInfo) -> StatsRequest | list[StatsRequest] | None:
        """(``owns_stats_inputs`` only) the prepared inputs whose statistics should update the state now, and the
        per-layer in-batch mix to compute them with (None = the given statistics), or None for no update; a
        list: several, each passed to ``update_stats`` in order. ``x`` is this batch (prepared for the graphs);
        a method may keep some of it. Default: None."""
        return None

    def last_batch_skewed(self) -> bool:
        """The method's guard judged the last batch label-skewed (the runtime then keeps every batch off its own
        statistics until it is not). Default: never."""
        return False

    def detects_skew(self, logits: np.ndarray) -> bool:
        """Would the method's guard call a batch with these logits label-skewed (side-effect free)? Default: no."""
        return False

    def reset_requested(self) -> bool:
        """After ``adjust``: this member asks its composite to reset every member to the source state (a collapse
        detector). Default: never."""
        return False

    def on_collapse_reset(self) -> None:
        """The composite resets its members (a member asked for it). Default: back to the source state."""
        self.reset()

    def on_mixed(self) -> None:  # noqa: B027 - optional hook
        """The runtime predicted this batch with an in-batch mix of its own choosing (a shift, nothing folded yet;
        ``forward_mix`` had said None): a method that mixes every few batches counts from here. Default: nothing."""

    def on_shift(self) -> None:  # noqa: B027 - optional hook
        """The runtime saw a domain shift (a jump in mean entropy). Default: nothing."""

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        """Output-side adaptation; returns logits or log-probabilities [N,C]. Default: identity."""
        return logits

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def stats_version(self) -> int:
        """Changes whenever ``forward_stats`` would return different values (compare for inequality only)."""
        return self._stats_version

    def _bump_stats(self) -> None:
        self._stats_version += 1

    def reset(self) -> None:
        """Back to the state right after construction."""

    def _state(self) -> dict[str, np.ndarray]:
        return {}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        """Install validated state (same names, shapes and dtypes as ``_state``)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in self._state().items()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = self._state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"method {self.name!r}: state mismatch: missing {missing}, unexpected {unexpected}"
            )
        checked = {}
        for k, ref in expected.items():
            v = np.asarray(state[k])
            if v.shape != ref.shape:
                raise ValueError(f"method {self.name!r}: state {k!r} has shape {list(v.shape)}, expected {list(ref.shape)}")
            checked[k] = v.astype(ref.dtype, copy=True)
        self._set_state(checked)

    def _check_batch_stats(self, batch_stats: Stats) -> None:
        missing = set(self.layer_names) - set(batch_stats)
        extra = set(batch_stats) - set(self.layer_names)
        if missing or extra:
            raise ValueError(
                f"method {self.name!r}: batch statistics do not match the norm layers: "
                f"missing {sorted(missing)[:5]}, unknown {sorted(extra)[:5]}"
            )
        for nl in self.ctx.norm_layers:
            m, v = batch_stats[nl.name]
            if np.shape(m) != (nl.channels,) or np.shape(v) != (nl.channels,):
                raise ValueError(f"method {self.name!r}: batch statistics of {nl.name} have the wrong shape")

    def __repr__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name}{':' + opts if opts else ''})"
