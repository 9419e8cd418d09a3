"""The embedded default: FMNIST-C stream, reference edge + teacher models, exported bundle, cloud home.

Everything is built on first use and cached under ``$EDGEADAPT_CACHE`` (default ``~/.cache/edgeadapt``);
later calls are instant. Used by the demo and the benchmarks' defaults.
"""

from __future__ import annotations

from pathlib import Path

EDGE_ARCH = "resnet_edge"
TEACHER_ARCH = "resnet_teacher"
BUNDLE_NAME = "fmnist-edge"
EVAL_IMAGES = 2000  # clean test images the first-use training evaluates on


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


def _ensure_model(arch: str, console=None) -> Path:
    path = model_path(arch)
    if not path.is_file():
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
