"""A served batch's answers as arrays (device/predictions.py): a request's slice of a batch serializes to exactly
what the same rows alone would, with the per-batch lists computed once and shared by the batch's requests."""

from __future__ import annotations

import numpy as np
import orjson

from edgeadapt.device.predictions import Predictions
from edgeadapt.device.server import v1_payload


def _batch(n: int, classes: int = 5, seed: int = 0) -> Predictions:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs[0, :2] = probs[0, 0]  # a tie: the order must be stable, the same in the batch and alone
    return Predictions(pred=probs.argmax(1), probs=probs, logits=logits, ood=rng.random(n) > 0.5,
                       ood_score=rng.random(n).astype(np.float32), entropy=rng.random(n).astype(np.float32),
                       param_version=3, labels=[f"c{i}" for i in range(classes)])


def _alone(p: Predictions, lo: int, hi: int) -> Predictions:
    return Predictions(p.pred[lo:hi].copy(), p.probs[lo:hi].copy(), p.logits[lo:hi].copy(), p.ood[lo:hi].copy(),
                       p.ood_score[lo:hi].copy(), p.entropy[lo:hi].copy(), p.param_version, p.labels)


def test_a_requests_slice_answers_as_its_rows_alone_would():
    batch = _batch(9)
    for lo, hi in ((0, 1), (1, 4), (4, 9)):
        part = batch[lo:hi]
        for top_k, probs in ((3, False), (1, True), (50, False)):
            got = orjson.loads(v1_payload(part, "m", top_k, probs))
            want = orjson.loads(v1_payload(_alone(batch, lo, hi), "m", top_k, probs))
            assert got == want
            assert len(got["predictions"]) == hi - lo and got["param_version"] == 3
        assert part.batch is batch and part.start == lo
    # one set of lists per (top_k, probs) for the whole batch, shared by its slices
    assert set(batch._lists) == {(3, False), (1, True), (50, False)}
    assert batch[2:5][1:2].start == 3  # a slice of a slice still points into its batch
    odd = batch[::2]  # not contiguous: answered from its own rows, never from the batch's
    assert orjson.loads(v1_payload(odd, "m", 3, False)) == orjson.loads(
        v1_payload(Predictions(*(getattr(batch, f)[::2] for f in ("pred", "probs", "logits", "ood", "ood_score",
                                                                   "entropy")), 3, batch.labels), "m", 3, False))
