"""Every registered update-package codec round-trips: the parts it writes are the ones ``part_shapes`` expects
(dtype and shape, so the device's pre-decompression checks hold), ``decode(encode(Δ))`` reconstructs the target
within the mode's precision (exactly for a lossless one), and a signed package of each verifies on the device."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.core import signing
from edgeadapt.core import update_package as U
from edgeadapt.core.update_codecs import REGISTRY, Codec, CodecRejected, codec

QUANTIZED = ("int8", "ecq", "int4")  # error at most half the tensor's step (nothing clips by default)
SPARSE = ("ternary", "bitmask_fp16")  # entries dropped: checked on the ones kept


def _params(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    base = {"a.weight": rng.normal(size=(16, 8)), "a.bias": rng.normal(size=(8,)),
            "b.weight": rng.normal(size=(3, 3, 5)), "c.unchanged": rng.normal(size=(7,)),
            "d.empty": np.zeros((0,))}
    base = {k: v.astype(np.float32) for k, v in base.items()}
    target = {k: (v + rng.normal(0, 0.05, v.shape) * (rng.random(v.shape) < 0.6)).astype(np.float32)
              for k, v in base.items()}
    target["c.unchanged"] = base["c.unchanged"].copy()
    return base, target


def test_registry_is_the_package_modes():
    assert tuple(REGISTRY) == U.MODES == ("fp32", "fp16", "int8", "int4", "ecq", "ternary", "bitmask_fp16")
    assert U.LOSSLESS_MODES == ("fp32",)
    assert all(isinstance(c, Codec) and c.name == m for m, c in REGISTRY.items())
    with pytest.raises(KeyError):
        codec("zip")


@pytest.mark.parametrize("mode", list(REGISTRY))
def test_codec_round_trip(mode):
    c = codec(mode)
    base, target = _params()
    names = sorted(base)
    opts = {"density": 0.5} if mode in SPARSE else {}
    arrays, entries = c.encode(names, base, target, opts)
    assert [e["name"] for e in entries] == names and all(e["encoding"] == mode for e in entries)
    expected = c.part_shapes(entries)
    assert set(arrays) == set(expected) == set(c.parts)
    for k, (dtype, shape) in expected.items():
        assert str(arrays[k].dtype) == dtype and tuple(arrays[k].shape) == shape, k
    recon = c.decode(entries, base, arrays)
    assert set(recon) == set(names)
    for i, n in enumerate(names):
        assert recon[n].dtype == np.float32 and recon[n].shape == base[n].shape
        delta = target[n] - base[n]
        err = np.abs(recon[n] - target[n])
        if not delta.size:
            continue
        if n == "c.unchanged":
            assert np.array_equal(recon[n], target[n]), (mode, n)  # an unchanged tensor stays exact
        elif mode in QUANTIZED:
            assert err.max() <= 0.5 * float(arrays["scale"][i]) * (1 + 1e-5) + 1e-7, (mode, n, err.max())
        elif mode in ("fp32", "fp16"):
            assert err.max() <= (1e-3 if mode == "fp16" else 1e-6) * np.abs(delta).max() + 1e-6, (mode, n)
        else:  # sparse: what is not kept is exactly the base; what is kept moves towards the target
            moved = recon[n] != base[n]
            assert 0 < moved.sum() <= int(np.ceil(0.5 * delta.size))
            assert np.all(np.sign(recon[n] - base[n])[moved] == np.sign(delta)[moved])
    if c.lossless:
        assert all(np.array_equal(recon[n], target[n]) for n in names)


@pytest.mark.parametrize("mode", list(REGISTRY))
def test_codec_package_verifies_on_the_device(mode):
    """Through the package layer: the device's reconstruction is bit-identical to the cloud's."""
    base, target = _params(1)
    key = signing.generate_private_key()
    built = U.build_package_full("m", 0, base, 1, target, mode, key)
    assert built.header["compression"] == mode and built.header["target"]["lossless"] == codec(mode).lossless
    version, params, _ = U.verify_and_apply(built.data, key.public_key(), "m", 0, base)
    assert version == 1
    assert all(np.array_equal(params[n], built.params[n]) for n in base)


@pytest.mark.parametrize("mode", list(REGISTRY))
def test_codec_with_no_tensors(mode):
    c = codec(mode)
    arrays, entries = c.encode([], {}, {}, {})
    assert entries == [] and c.decode(entries, {}, arrays) == {}
    assert {k: tuple(a.shape) for k, a in arrays.items()} == {k: s for k, (_, s) in c.part_shapes([]).items()}


def test_sparse_codec_refuses_counts_that_disagree_with_the_header():
    base, target = _params(2)
    c = codec("bitmask_fp16")
    arrays, entries = c.encode(sorted(base), base, target, {"density": 0.3})
    bad = [dict(e) for e in entries]
    bad[0]["nnz"] += 1
    with pytest.raises(CodecRejected, match="bitmask has"):
        c.decode(bad, base, arrays)
    bad[0]["nnz"] = -1
    with pytest.raises(CodecRejected, match="bad nnz"):
        c.part_shapes(bad)


def test_int4_refuses_the_unused_code():
    base, target = _params(3)
    c = codec("int4")
    arrays, entries = c.encode(sorted(base), base, target, {})
    arrays["q"] = arrays["q"].copy()
    arrays["q"][0] = 0  # code 0 is never written (codes are 1..15)
    with pytest.raises(CodecRejected, match="invalid int4 code"):
        c.decode(entries, base, arrays)
