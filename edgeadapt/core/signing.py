"""ed25519 keys that sign update packages (torch-free, used by both sides).

The cloud holds the private key (PEM, PKCS#8, file mode 0600); devices hold only the public key, as base64 of
its 32 raw bytes in the bundle manifest (``cloud_public_key``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub"
SIGNATURE_BYTES = 64


class SigningKeyError(ValueError):
    """A key file or key string is missing or malformed (message says which and why)."""


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> None:
    """Write the private key as unencrypted PKCS#8 PEM, readable by the owner only (0600)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _atomic_write(Path(path), pem, 0o600)


def save_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: str | Path) -> None:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _atomic_write(Path(path), pem, 0o644)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / PRIVATE_KEY_FILE
    if not p.is_file():
        raise SigningKeyError(f"signing key {p} does not exist (create one with `edgeadapt cloud init`)")
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{p}: not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{p}: not an ed25519 key ({type(key).__name__})")
    return key


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """base64 of the 32 raw public-key bytes (the form the bundle manifest carries)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SigningKeyError(f"public key is not valid base64: {exc}") from exc
    if len(raw) != 32:
        raise SigningKeyError(f"an ed25519 public key has 32 bytes, this one has {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def load_public_key(source: str | Path | bytes | Ed25519PublicKey | Ed25519PrivateKey) -> Ed25519PublicKey:
    """A public key from: a key object, 32 raw bytes, a base64 string, or a file / cloud home directory
    (public PEM, private PEM, or a file holding the base64 string)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, Ed25519PrivateKey):
        return source.public_key()
    if isinstance(source, bytes):
        if len(source) != 32:
            raise SigningKeyError(f"raw ed25519 public key must have 32 bytes, not {len(source)}")
        return Ed25519PublicKey.from_public_bytes(source)
    if isinstance(source, str) and not os.path.exists(os.path.expanduser(source)) and len(source.strip()) == 44:
        return public_key_from_b64(source)
    p = Path(source).expanduser()
    if p.is_dir():
        for name in (PUBLIC_KEY_FILE, PRIVATE_KEY_FILE):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise SigningKeyError(f"{p} holds no {PUBLIC_KEY_FILE} or {PRIVATE_KEY_FILE}")
    if not p.is_file():
        raise SigningKeyError(f"public key file {p} does not exist")
    data = p.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_private_key(p).public_key()
    if b"PUBLIC KEY" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise SigningKeyError(f"{p}: invalid PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise SigningKeyError(f"{p}: not an ed25519 public key ({type(key).__name__})")
        return key
    try:
        return public_key_from_b64(data.decode("ascii"))
    except (UnicodeDecodeError, SigningKeyError) as exc:
        raise SigningKeyError(f"{p}: neither a PEM key nor a base64 ed25519 public key") from exc


def load_public_key_b64(path: str | Path) -> str:
    """What ``edgeadapt export --cloud-key PATH`` puts into the manifest: base64 raw public key read from a
    public or private PEM file, a file holding the base64 string, or a cloud home directory."""
    return public_key_b64(load_public_key(Path(path)))


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return hashlib.sha256(base64.b64decode(public_key_b64(key))).hexdigest()[:16]


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
