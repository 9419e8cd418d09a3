"""The embedded default: FMNIST-C stream, reference edge + teacher models, exported bundle, cloud home.

Everything is built on first use and cached under ``$EDGEADAPT_CACHE`` (default ``~/.cache/edgeadapt``);
later calls are instant. Used by the demo and the benchmarks' defaults.

The two reference models ship with the package (``edgeadapt/models/pretrained``, 3.1 MB): training them was
335 s of a 623 s cold start on this machine kind. They are the output of ``edgeadapt train`` at the default
configuration (seed 0) and are used only when their checksum and their recorded training configuration match
what this code would train; otherwise, or with ``EDGEADAPT_EMBEDDED_WEIGHTS=0``, they are trained here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

EDGE_ARCH = "resnet_edge"
TEACHER_ARCH = "resnet_teacher"
BUNDLE_NAME = "fmnist-edge"
EVAL_IMAGES = 2000  # clean test images the first-use training evaluates on
EMBEDDED_DIR = Path(__file__).parent / "models" / "pretrained"
#: sha256 of each shipped weights file: a truncated or altered checkout is trained afresh, never loaded
EMBEDDED_SHA256 = {
    EDGE_ARCH: "fb09a9cb9b4b24f4963965f6271d39cef977a406503b6466fa53a0651fba7eef",
    TEACHER_ARCH: "a77aedc5fbff89efecdba520a396d784a3a486fc2f957ac8c6835613c8028cb3",
}


def cache_dir() -> Path:
    from edgeadapt.datasets.fmnist import default_cache_dir

    d = default_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(f"[cyan]•[/] {msg}")


def default_stream(console=None) -> Path:
    from edgeadapt.datasets.fmnist import build_fmnist_c, stream_filename

    out = cache_dir() / "data"
    path = out / stream_filename()
    if not path.is_file():
        _say(console, "building the FMNIST-C stream (15 corruptions x 2000, severity 5)")
    return build_fmnist_c(out, progress=console is not None)


def model_path(arch: str) -> Path:
    return cache_dir() / "models" / f"{arch}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_weights(arch: str) -> tuple[Path | None, str]:
    """The shipped weights for ``arch`` if they may be used, else ``None`` and why not."""
    if os.environ.get("EDGEADAPT_EMBEDDED_WEIGHTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "EDGEADAPT_EMBEDDED_WEIGHTS=0"
    path = EMBEDDED_DIR / f"{arch}.safetensors"
    if arch not in EMBEDDED_SHA256 or not path.is_file():
        return None, f"no embedded weights for {arch}"
    if _sha256(path) != EMBEDDED_SHA256[arch]:
        return None, f"{path} does not match its recorded checksum"
    from edgeadapt.models.training import metadata_matches, read_metadata, resolve_config

    if not metadata_matches(read_metadata(path), resolve_config(arch)):
        return None, f"{path} was trained with another configuration than this version's default"
    return path, "ok"


def _ensure_model(arch: str, console=None) -> Path:
    path = model_path(arch)
    if not path.is_file():
        embedded, why = embedded_weights(arch)
        if embedded is not None:
            _say(console, f"using the shipped {arch} weights (retrain: edgeadapt train --arch {arch} --out {path} --force)")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            shutil.copyfile(embedded, tmp)
            tmp.replace(path)
            return path
        _say(console, f"not using shipped weights for {arch}: {why}")
        from edgeadapt.models.training import train_model

        _say(console, f"training {arch} (cached after the first run)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # the clean accuracy kept in the weights' metadata from 2,000 test images, not all 10,000: the full
        # evaluation of the teacher was ~50 s of a cold start with no progress to show (the benchmarks measure
        # the models on the stream themselves)
        train_model(arch, path, progress=console is not None, test_limit=EVAL_IMAGES)
    return path


def default_teacher(console=None) -> tuple[str, Path]:
    return TEACHER_ARCH, _ensure_model(TEACHER_ARCH, console)


def cloud_home(console=None) -> Path:
    """A cloud home with its signing key (the bundle embeds the public half)."""
    from edgeadapt.cloud.admin import init_home

    home = cache_dir() / "cloud-home"
    if not (home / "config.toml").is_file():
        _say(console, f"initializing the cloud home {home}")
        init_home(home)
    return home


def public_key_file(home: Path) -> Path:
    for name in ("signing_key.pub", "signing.pub", "public_key.pem"):
        if (home / name).is_file():
            return home / name
    pubs = sorted(home.glob("*.pub")) + sorted(home.glob("*public*"))
    if not pubs:
        raise FileNotFoundError(f"no public key in cloud home {home}")
    return pubs[0]


def default_bundle(console=None, adapters: int = 0) -> Path:
    """The reference edge model exported with the default profile, trusting the default cloud home's key
    (``adapters`` > 0: with zero-initialized low-rank conv adapters of that rank as adaptable tensors)."""
    out = cache_dir() / "bundles" / (BUNDLE_NAME + (f"-adapters{adapters}" if adapters else ""))
    if (out / "manifest.json").is_file():
        return out
    import numpy as np

    from edgeadapt.core.signing import load_public_key_b64
    from edgeadapt.datasets.fmnist import load_fmnist
    from edgeadapt.export.exporter import ExportSpec, export_bundle
    from edgeadapt.export.profile import ExportProfile
    from edgeadapt.models.reference import FMNIST_LABELS, build_arch
    from edgeadapt.models.training import load_weights

    weights = _ensure_model(EDGE_ARCH, console)
    home = cloud_home(console)
    _say(console, "exporting the edge bundle")
    model = build_arch(EDGE_ARCH)
    load_weights(model, weights)
    adapter_cfg: dict = {}
    if adapters:
        from edgeadapt.models.adapters import insert_adapters

        adapter_cfg = {"rank": adapters, "patterns": None, "targets": insert_adapters(model, adapters)}
    profile = ExportProfile()
    x, y = load_fmnist("train")
    idx = np.random.default_rng(0).choice(len(x), profile.calib_samples, replace=False)
    export_bundle(model, ExportSpec(arch=EDGE_ARCH, model_name=BUNDLE_NAME, labels=FMNIST_LABELS,
                                    input_shape=[1, 32, 32], adapters=adapter_cfg,
                                    cloud_public_key=load_public_key_b64(public_key_file(home))),
                  x[idx], y[idx], out, profile)
    return out
