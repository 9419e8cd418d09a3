"""``t3a``: Test-Time Template Adjuster (Iwasawa & Matsuo, NeurIPS 2021), forward-only.

Supports per class start from the classifier rows (each row w_c joins the support of its own predicted class
argmax(W w_c + b), with entropy H(softmax(W w_c + b)), as in the authors' code). Each batch, every sample's
L2-normalized feature joins the support of its predicted class argmax(logits) with entropy H(softmax(logits))
(``logits`` = the head's output the runtime passes in); each class then keeps its ``filter_k`` (the paper's M)
lowest-entropy supports (ties: older first). ``filter_k = -1`` keeps everything (stored as running class sums,
so memory stays bounded). The batch joins before it is predicted (as in the paper).

Prediction (the paper's formula): c_k = sum of class k's normalized supports, logits = z . c_k / ||c_k|| with the
raw feature z, so the logits carry ||z|| as their natural scale (comparable sharpness to a linear head).
``normalize_z=True`` uses the cosine instead; then set ``temperature`` (logits = cos / temperature, e.g. 0.05)
so the softmax is not near-uniform. ``temperature`` divides the logits in both modes (default 1).

``reliable_only`` (default True): only samples the runtime marks reliable (not OOD, low entropy) join the
supports, so OOD inputs never become templates. Memory: filter_k * C * D float32 plus C * filter_k entropies.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.core.mathops import entropy_from_logits
from edgeadapt.device.methods.base import AdaptationMethod, BatchInfo
from edgeadapt.device.methods.registry import register


def _l2n(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


@register
class T3A(AdaptationMethod):
    name = "t3a"
    defaults = {"filter_k": 100, "temperature": 1.0, "normalize_z": False, "reliable_only": True}

    def _validate(self) -> None:
        self.ctx.require("head_weight", method=self.name)
        o = self.options
        self._check(o["filter_k"] == -1 or o["filter_k"] >= 1, "filter_k must be -1 (keep all) or >= 1")
        self._check(o["temperature"] > 0, "temperature must be > 0")

    def reset(self) -> None:
        super().reset()
        w = np.asarray(self.ctx.head_weight, np.float64)
        b = np.zeros(len(w)) if self.ctx.head_bias is None else np.asarray(self.ctx.head_bias, np.float64)
        c, d = w.shape
        self._c, self._d = c, d
        self._cls_sums = np.zeros((c, d), np.float64)  # sums of kept normalized supports, per class
        if self.options["filter_k"] == -1:
            self._counts = np.zeros(c, np.int64)
        else:
            m = self.options["filter_k"]
            self._sup = np.zeros((c, m, d), np.float32)
            self._ent = np.full((c, m), np.inf, np.float64)  # inf = empty slot
        warm_logits = w @ w.T + b
        self._add(_l2n(w), warm_logits.argmax(1), entropy_from_logits(warm_logits))

    def _add(self, z_norm: np.ndarray, labels: np.ndarray, ent: np.ndarray) -> None:
        if self.options["filter_k"] == -1:
            np.add.at(self._cls_sums, labels, z_norm)
            np.add.at(self._counts, labels, 1)
            return
        # all classes at once: each new sample is a candidate in its own class's row only (inf elsewhere);
        # a stable sort of [kept | new] per row keeps the filter_k lowest entropies, older first on ties
        m = self.options["filter_k"]
        n = len(labels)
        cand_ent = np.full((self._c, n), np.inf)
        cand_ent[labels, np.arange(n)] = ent
        cand_sup = np.zeros((self._c, n, self._d), np.float32)
        cand_sup[labels, np.arange(n)] = z_norm
        ents = np.concatenate([self._ent, cand_ent], axis=1)
        order = np.argsort(ents, axis=1, kind="stable")[:, :m]
        self._ent = np.take_along_axis(ents, order, axis=1)
        sups = np.concatenate([self._sup, cand_sup], axis=1)
        self._sup = np.take_along_axis(sups, order[:, :, None], axis=1)
        kept = np.isfinite(self._ent)
        self._cls_sums = np.einsum("cm,cmd->cd", kept.astype(np.float64), self._sup.astype(np.float64))

    def supports(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(normalized supports [m,D], entropies [m]) kept for class k (bounded mode only)."""
        if self.options["filter_k"] == -1:
            raise ValueError("t3a with filter_k=-1 keeps class sums only")
        kept = np.isfinite(self._ent[k])
        return self._sup[k][kept], self._ent[k][kept]

    def adjust(self, logits: np.ndarray, features: np.ndarray, batch_info: BatchInfo | None = None) -> np.ndarray:
        z = np.asarray(features, np.float64)
        use = np.ones(len(z), bool)
        if self.options["reliable_only"] and batch_info is not None:
            use = np.asarray(batch_info.reliable, bool)
        if use.any():
            lg = np.asarray(logits, np.float64)[use]
            self._add(_l2n(z[use]), lg.argmax(1), entropy_from_logits(lg))
        if self.options["normalize_z"]:
            z = _l2n(z)
        out = z @ _l2n(self._cls_sums).T / self.options["temperature"]
        return out.astype(np.float32)

    def _state(self) -> dict[str, np.ndarray]:
        if self.options["filter_k"] == -1:
            return {"class_sums": self._cls_sums, "counts": self._counts}
        return {"supports": self._sup, "entropy": self._ent}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        if self.options["filter_k"] == -1:
            self._cls_sums, self._counts = state["class_sums"], state["counts"]
            return
        self._sup, self._ent = state["supports"], state["entropy"]
        for k in range(self._c):
            kept = np.isfinite(self._ent[k])
            self._cls_sums[k] = self._sup[k][kept].astype(np.float64).sum(0)
