"""Update packages: round trip and rejection of every kind of bad package, for every compression mode."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard

from edgeadapt.core import signing
from edgeadapt.core import update_package as U
from edgeadapt.core.tensorfile import params_hash


@pytest.fixture(scope="module")
def key():
    return signing.generate_private_key()


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    base = {"layers.0.bn1.weight": rng.normal(1, 0.1, 16).astype(np.float32),
            "layers.0.bn1.running_var": rng.uniform(0.5, 2, 16).astype(np.float32),
            "layers.0.conv1.adapter.down.weight": rng.normal(0, 0.1, (4, 16, 3, 3)).astype(np.float32)}
    target = {k: v + rng.normal(0, 0.02, v.shape).astype(np.float32) for k, v in base.items()}
    return base, target


def _frame(header: dict, payload: bytes, key) -> bytes:
    return U._frame(header, payload, key)


def _parts(data: bytes):
    hbytes, payload, sig = U.split_package(data)
    return U._parse_header(hbytes), payload, sig


@pytest.mark.parametrize("mode", U.MODES)
def test_round_trip_every_mode(key, pair, mode):
    base, target = pair
    built = U.build_package_full("fmnist-edge", 3, base, 4, target, mode, key)
    pub = signing.public_key_b64(key)
    version, params, header = U.verify_and_apply(built.data, pub, "fmnist-edge", 3, base)
    assert version == 4 and header["compression"] == mode
    assert params_hash(params) == header["target"]["params_hash"] == params_hash(built.params)
    assert header["target"]["exact_hash"] == params_hash(target)
    for name in base:
        assert params[name].dtype == np.float32 and params[name].shape == base[name].shape
    if mode == "fp32":
        assert header["target"]["lossless"]
        assert all(np.array_equal(params[n], target[n]) for n in target)
    elif mode in ("fp16", "int8"):
        assert all(np.abs(params[n] - target[n]).max() < 2e-3 for n in target)
    elif mode == "int4":  # half a quantization step at most
        for n in target:
            step = np.abs(target[n] - base[n]).max() / 7
            assert np.abs(params[n] - target[n]).max() <= step / 2 + 1e-6
    elif mode == "ecq":  # half a step at most: rms/24 for vectors, rms/sqrt(1024/n) for small matrices
        for n in target:
            d = (target[n] - base[n]).astype(np.float64)
            k = 24 if d.ndim <= 1 else np.sqrt(max(1.0, 1024 / d.size))
            step = max(np.sqrt(np.mean(d * d)) / k, np.abs(d).max() / 127)
            assert np.abs(params[n] - target[n]).max() <= step / 2 + 1e-5
    else:  # sparse: ~10% of entries changed, each moved toward the target
        for n in target:
            changed = params[n] != base[n]
            assert 0 < changed.mean() <= 0.25
            assert np.all(np.sign(params[n] - base[n])[changed] == np.sign(target[n] - base[n])[changed])
    # the public key object and raw bytes work too
    U.verify_and_apply(built.data, signing.load_public_key(pub), "fmnist-edge", 3, base)


@pytest.mark.parametrize("mode", U.MODES)
def test_tamper_rejected_every_mode(key, pair, mode):
    base, target = pair
    data = U.build_package("fmnist-edge", 0, base, 1, target, mode, key)
    pub = signing.public_key_b64(key)
    header_start = len(U.MAGIC) + 4
    for pos in (header_start + 5, len(data) - 70, len(data) - 1):  # header, payload, signature
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(U.UpdateRejected, match="signature|bad magic|truncated|limit"):
            U.verify_and_apply(bytes(bad), pub, "fmnist-edge", 0, base)
    other = signing.generate_private_key()
    with pytest.raises(U.UpdateRejected, match="bad signature"):
        U.verify_and_apply(data, signing.public_key_b64(other), "fmnist-edge", 0, base)


def test_framing_errors(key, pair):
    base, target = pair
    data = U.build_package("m", 0, base, 1, target, "fp16", key)
    pub = signing.public_key_b64(key)
    with pytest.raises(U.UpdateRejected, match="bad magic"):
        U.verify_and_apply(b"XXXXX\n" + data[6:], pub, "m", 0, base)
    for cut in (3, 12, len(data) // 2, len(data) - 1):
        with pytest.raises(U.UpdateRejected, match="truncated|bad magic"):
            U.verify_and_apply(data[:cut], pub, "m", 0, base)
    with pytest.raises(U.UpdateRejected, match="trailing"):
        U.verify_and_apply(data + b"x", pub, "m", 0, base)
    with pytest.raises(U.UpdateRejected, match="no cloud public key"):
        U.verify_and_apply(data, None, "m", 0, base)


def test_semantic_rejections(key, pair):
    base, target = pair
    pub = signing.public_key_b64(key)
    data = U.build_package("m", 2, base, 5, target, "int8", key)
    with pytest.raises(U.UpdateRejected, match="wrong model"):
        U.verify_and_apply(data, pub, "other", 2, base)
    with pytest.raises(U.UpdateRejected, match="base version mismatch"):
        U.verify_and_apply(data, pub, "m", 1, base)
    with pytest.raises(U.UpdateRejected, match="hash mismatch"):
        U.verify_and_apply(data, pub, "m", 2, target)
    wrong_shape = {**base, "layers.0.bn1.weight": np.ones(8, np.float32)}
    with pytest.raises(U.UpdateRejected, match="shape mismatch|hash mismatch"):
        U.verify_and_apply(data, pub, "m", 2, wrong_shape)
    with pytest.raises(ValueError, match="newer"):
        U.build_package("m", 5, base, 5, target, "fp32", key)


def _resign(key, data: bytes, edit_header=None, payload: bytes | None = None) -> bytes:
    header, old_payload, _ = _parts(data)
    if edit_header:
        edit_header(header)
    return _frame(header, old_payload if payload is None else payload, key)


def test_signed_but_malicious_packages(key, pair):
    """Even a correctly signed package must not downgrade, smuggle shapes, NaNs or decompression bombs."""
    base, target = pair
    pub = signing.public_key_b64(key)
    data = U.build_package("m", 2, base, 3, target, "fp16", key)

    def downgrade(h):
        h["target"]["version"] = 2

    with pytest.raises(U.UpdateRejected, match="downgrade"):
        U.verify_and_apply(_resign(key, data, downgrade), pub, "m", 2, base)

    def reshape(h):
        h["tensors"][0]["shape"] = [4, 4]  # same element count as 16

    with pytest.raises(U.UpdateRejected, match="shape mismatch"):
        U.verify_and_apply(_resign(key, data, reshape), pub, "m", 2, base)

    # NaN in the payload (re-encoded and re-signed)
    from safetensors.numpy import load, save

    header, payload, _ = _parts(data)
    arrays = load(zstandard.ZstdDecompressor().decompress(payload))
    k0 = sorted(arrays)[0]
    arrays[k0] = arrays[k0].copy()
    arrays[k0][0] = np.nan
    nan_payload = zstandard.ZstdCompressor().compress(save(arrays))
    with pytest.raises(U.UpdateRejected, match="non-finite"):
        U.verify_and_apply(_frame(header, nan_payload, key), pub, "m", 2, base)

    # decompression bomb: a tiny payload that inflates far beyond what the header's tensors need
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(U.UpdateRejected, match="decompress"):
        U.verify_and_apply(_frame(header, bomb, key), pub, "m", 2, base)

    # oversize declared header length
    evil = U.MAGIC + struct.pack(">I", U.MAX_HEADER_BYTES + 1) + b"{}"
    with pytest.raises(U.UpdateRejected, match="limit"):
        U.verify_and_apply(evil, pub, "m", 2, base)


def test_compression_ratio_and_sizes(key):
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=20000).astype(np.float32)}
    target = {"w": base["w"] + rng.normal(0, 0.01, 20000).astype(np.float32)}
    raw = U.raw_fp32_bytes(target)
    sizes = {m: len(U.build_package("m", 0, base, 1, target, m, key)) for m in U.MODES}
    assert sizes["fp16"] < sizes["fp32"] and sizes["int8"] < sizes["fp16"] and sizes["int4"] < sizes["int8"]
    assert raw / sizes["int4"] >= 6
    assert raw / sizes["ternary"] >= 8
    assert raw / sizes["bitmask_fp16"] >= 5


def test_signing_key_files(tmp_path):
    key = signing.generate_private_key()
    signing.save_private_key(key, tmp_path / "k.pem")
    signing.save_public_key(key, tmp_path / "k.pub.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    b64 = signing.public_key_b64(key)
    assert signing.load_public_key_b64(tmp_path / "k.pem") == b64
    assert signing.load_public_key_b64(tmp_path / "k.pub.pem") == b64
    (tmp_path / "k.txt").write_text(b64 + "\n")
    assert signing.load_public_key_b64(tmp_path / "k.txt") == b64
    assert signing.public_key_b64(signing.load_private_key(tmp_path / "k.pem")) == b64
    with pytest.raises(signing.SigningKeyError):
        signing.public_key_from_b64("bm90IGEga2V5")


def test_ecq_entropy_codes_matrices_coarsely_and_vectors_finely(key):
    """ecq: a Gaussian matrix delta costs ~2-3 bits per value after zstd (ratio > 8), a vector delta keeps a
    24x finer step; the package decodes like int8 on the device."""
    rng = np.random.default_rng(2)
    base = {"adapter.weight": rng.normal(size=(128, 128)).astype(np.float32),
            "bn.weight": np.ones(64, np.float32)}
    target = {"adapter.weight": base["adapter.weight"] + rng.normal(0, 0.01, (128, 128)).astype(np.float32),
              "bn.weight": base["bn.weight"] + rng.normal(0, 0.1, 64).astype(np.float32)}
    data = U.build_package("m", 0, base, 1, target, "ecq", key)
    assert U.raw_fp32_bytes(target) / len(data) > 8
    _, params, header = U.verify_and_apply(data, signing.public_key_b64(key), "m", 0, base)
    err_m = np.abs(params["adapter.weight"] - target["adapter.weight"]).max()
    err_v = np.abs(params["bn.weight"] - target["bn.weight"]).max()
    assert err_m <= 0.01 * 2 and err_v <= 0.1 * 2 / 24  # half a step, with the sample rms near the true one
    assert header["mode_opts"] == {}
    fine = U.build_package("m", 0, base, 1, target, "ecq", key, matrix_k=4)
    assert len(fine) > len(data)
    # an outlier is not clipped: the step grows to max/127 instead
    spiky = {**target, "bn.weight": target["bn.weight"].copy()}
    spiky["bn.weight"][0] += 50.0
    _, rec, _ = U.verify_and_apply(U.build_package("m", 0, base, 1, spiky, "ecq", key), signing.public_key_b64(key),
                                   "m", 0, base)
    assert abs(rec["bn.weight"][0] - spiky["bn.weight"][0]) < 0.5
