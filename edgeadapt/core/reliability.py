"""What "reliable" means, once, for the engine, the selector and the trainer's loss (issue 17 item 5).

A prediction is *reliable* when the sample is not novel (OOD) and its entropy is below ``factor * ln C``
(C classes; ln C is the entropy of a uniform guess, so a factor reads the same at 10 or 1,000 classes). Two
uses need two bounds, and they are two named roles of one policy rather than two constants in two files:

* ``adapt_factor`` (0.8): may the sample drive forward-only adaptation of the device's state (normalization
  statistics, output-side methods)? Statistics are means over many samples, so a loose bound keeps enough of
  a batch to estimate them (the engine samples ``stats_samples`` of the reliable ones, and uses the whole
  forward's statistics when ``full_batch_reliable`` of the batch passes); a sample only needs to be not
  hopeless. Under a covariate shift the OOD flag is not held against a sample: when more than
  ``max_ood_fraction`` of a batch is flagged, the batch is a new domain, not a crowd of novel inputs (the
  entropy bound still applies; docs/NOTES.md "Covariate shift vs novelty").
* ``upload_factor`` (0.4, EATA's / CEMA's E_0): is the sample worth the cloud's bandwidth and a place in the
  distillation loss? An upload is trained on one sample at a time, so the bound is tight: the selector uploads
  only E < E_max(t) (and above ``low_info_factor * ln C``: a near-certain sample teaches nothing), and the
  trainer weights each sample's loss by ``exp(E_max - H)``, the same E_max. E_max(t) follows the stream
  after a warm-up (CEMA): ``lam * E_max * E_now / E_warm``, E_warm the mean entropy of the first ``warmup``
  samples and E_now a moving average over ``now_window`` samples; the selector keeps those running means,
  the schedule is defined here. A flagged sample is never uploaded as adaptation data, whatever the batch's
  OOD fraction (routing a shifted batch's flagged samples as adaptation data was measured: no gain, NOTES).

The device side holds one policy (DeviceConfig.reliability -> EngineConfig.reliability -> the engine, and the
daemon hands the engine's policy to its selector); the cloud trainer's loss uses ``DEFAULT_RELIABILITY``
(not configurable there). numpy only: the device stays torch-free, the trainer wraps ``upload_bound`` in torch.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["DEFAULT_RELIABILITY", "ReliabilityPolicy"]


class ReliabilityPolicy(BaseModel):
    """The entropy bounds (as fractions of ln C) and OOD rule that decide which samples are trusted, per role."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    adapt_factor: float = Field(0.8, gt=0, description="a sample may update the device's adaptation "
                                "state when its entropy is below adapt_factor * ln C (and it is not OOD)")
    upload_factor: float = Field(0.4, gt=0, description="E_max = upload_factor * ln C: the selector "
                                 "uploads samples below E_max(t); the trainer weights its loss by exp(E_max - H)")
    low_info_factor: float = Field(0.02, ge=0, description="E_min = low_info_factor * ln C: samples at "
                                   "or below it are too certain to be worth uploading")
    warmup: int = Field(256, ge=1, description="samples whose mean entropy is E_warm (E_max(t) = E_max until then)")
    lam: float = Field(1.0, gt=0, description="E_max(t) = lam * E_max * E_now / E_warm after the warm-up")
    now_window: int = Field(512, ge=1, description="effective window (samples) of E_now's moving average")
    max_ood_fraction: float = Field(0.5, ge=0, le=1, description="a batch with more of its samples flagged OOD "
                                    "is a domain shift: its flags do not exclude samples from adaptation")

    @model_validator(mode="after")
    def _band(self) -> ReliabilityPolicy:
        if self.low_info_factor >= self.upload_factor:
            raise ValueError(f"low_info_factor ({self.low_info_factor}) must be below upload_factor "
                             f"({self.upload_factor}): no entropy would be worth uploading")
        return self

    # -- bounds (nats) ------------------------------------------------------------------------------
    def adapt_bound(self, num_classes: int) -> float:
        """Entropy below which a sample may drive the device's adaptation."""
        return self.adapt_factor * _log_c(num_classes)

    def upload_bound(self, num_classes: int) -> float:
        """E_max: the selector's bound before its warm-up ends, and the trainer's loss-weight centre."""
        return self.upload_factor * _log_c(num_classes)

    def low_info_bound(self, num_classes: int) -> float:
        """E_min: entropy at or below which a sample is too certain to be worth uploading."""
        return self.low_info_factor * _log_c(num_classes)

    def upload_bound_now(self, num_classes: int, warm_mean: float | None, now_mean: float | None) -> float:
        """E_max(t) given the stream's warm-up mean entropy (None until the warm-up ends) and its moving mean."""
        base = self.upload_bound(num_classes)
        if warm_mean is None or now_mean is None or warm_mean <= 1e-12:
            return base
        return self.lam * base * now_mean / warm_mean

    # -- masks ---------------------------------------------------------------------------------------
    def is_domain_shift(self, ood: np.ndarray) -> bool:
        """More than ``max_ood_fraction`` of the batch flagged: a new domain, not novel inputs."""
        ood = np.asarray(ood, bool)
        return bool(ood.size) and float(ood.mean()) > self.max_ood_fraction

    def adapt_mask(self, entropy: np.ndarray, ood: np.ndarray, num_classes: int) -> np.ndarray:
        """bool [N]: samples that may drive forward-only adaptation (the engine's ``reliable``)."""
        entropy, ood = _check(entropy, ood)
        excluded = np.zeros_like(ood) if self.is_domain_shift(ood) else ood
        return ~excluded & (entropy < self.adapt_bound(num_classes))

    @staticmethod
    def upload_mask(entropy: np.ndarray, ood: np.ndarray, e_max: float) -> np.ndarray:
        """bool [N]: samples reliable enough to upload under the bound ``e_max`` (E_max(t)); OOD never is."""
        entropy, ood = _check(entropy, ood)
        return ~ood & (entropy < e_max)


def _log_c(num_classes: int) -> float:
    if num_classes < 2:
        raise ValueError(f"reliability needs at least 2 classes, got {num_classes}")
    return math.log(num_classes)


def _check(entropy: np.ndarray, ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    entropy = np.asarray(entropy, np.float64).ravel()
    ood = np.asarray(ood, bool).ravel()
    if entropy.shape != ood.shape:
        raise ValueError(f"entropy and ood flags disagree on N: {entropy.shape[0]} vs {ood.shape[0]}")
    return entropy, ood


#: the one policy the device and the cloud use unless a device config says otherwise
DEFAULT_RELIABILITY = ReliabilityPolicy()
