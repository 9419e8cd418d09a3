"""The model registry (issue 18 item 1): several models per cloud, each a bundle and the teacher that trains its
devices' versions.

A model's id is its bundle's model name, the name its devices already send with every upload, heartbeat and
update check. ``add_model`` checks everything a serving cloud would trip over later, before anything is written:
the bundle reads and verifies, it was exported for this cloud's signing key, its architecture rebuilds, the
teacher builds with its weights and answers one sample of the bundle's input with the bundle's number of
classes. The configured ``bundle`` + ``teacher`` are registered the same way at each start (idempotently,
``CloudService``), so a one-model cloud needs no registry command at all.
"""

from __future__ import annotations

from pathlib import Path

from edgeadapt.cloud.store import ModelRecord, Store, StoreError, register_bundle


class RegistryError(ValueError):
    """A model cannot be registered (the message says why and what to do)."""


def check_model(bundle: str | Path, teacher: str | None, teacher_weights: str | Path | None = None,
                teacher_kwargs: dict | None = None, student_model: str | None = None,
                public_key_b64: str | None = None) -> None:
    """Everything about a model that would fail a serving cloud, as one clear error: a missing or bad bundle, one
    exported for another cloud key, an unknown teacher, teacher weights that are missing or do not fit, a teacher
    whose classes are not the bundle's."""
    from edgeadapt.core import bundle as B

    bundle = Path(bundle).expanduser()
    if not bundle.is_dir():
        raise RegistryError(f"bundle {bundle}: no such directory (export one with `edgeadapt export`)")
    try:
        manifest = B.Bundle(bundle).manifest  # reads and verifies the files the manifest lists
    except (B.BundleError, OSError, ValueError) as exc:
        raise RegistryError(f"bundle {bundle} is not a valid bundle: {exc}") from None
    if public_key_b64 is not None and manifest.cloud_public_key not in (None, public_key_b64):
        raise RegistryError(f"bundle {bundle} was exported for another cloud key ({manifest.cloud_public_key[:12]}…, "
                            f"this cloud signs with {public_key_b64[:12]}…): its devices would reject every update; "
                            "re-export it with --cloud-key <home>/signing_key.pub")
    if teacher_weights is not None and not Path(teacher_weights).expanduser().is_file():
        raise RegistryError(f"teacher weights {teacher_weights}: no such file")
    import torch

    from edgeadapt.cloud.edge_model import ModelError, load_teacher, rebuild_edge_model

    try:
        rebuild_edge_model(bundle, student_model=student_model)
    except (ModelError, ValueError) as exc:
        raise RegistryError(f"bundle {bundle}: its architecture cannot be rebuilt for training ({exc}); for a bundle "
                            "exported with --model, give --student-model package.module:factory") from None
    if teacher is None:
        return
    try:
        model = load_teacher(teacher, Path(teacher_weights).expanduser() if teacher_weights else None,
                             **(teacher_kwargs or {}))
    except ModelError as exc:
        raise RegistryError(f"teacher {teacher!r}: weights {teacher_weights} do not fit it: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise RegistryError(f"unknown teacher {teacher!r}: {exc}") from None
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *manifest.input.shape))
    except Exception as exc:  # any failure of the operator's module on the bundle's input is the answer
        raise RegistryError(f"teacher {teacher!r} fails on one input of the bundle's shape "
                            f"{manifest.input.shape}: {type(exc).__name__}: {exc}") from None
    if tuple(out.shape) != (1, manifest.num_classes):
        raise RegistryError(f"teacher {teacher!r} answers {list(out.shape)[1:]} logits per sample; the bundle's "
                            f"model {manifest.model_name!r} has {manifest.num_classes} classes")


def add_model(store: Store, bundle: str | Path, teacher: str | None, teacher_weights: str | Path | None = None,
              teacher_kwargs: dict | None = None, student_model: str | None = None,
              public_key_b64: str | None = None) -> ModelRecord:
    """Check (``check_model``) and register a new model: its registry row and its bundle's parameters as its
    version 0. A model already registered is refused."""
    from edgeadapt.core import bundle as B

    check_model(bundle, teacher, teacher_weights, teacher_kwargs, student_model, public_key_b64)
    weights = str(Path(teacher_weights).expanduser().resolve()) if teacher_weights else None
    try:
        manifest = register_bundle(store, Path(bundle).expanduser(), teacher, weights, teacher_kwargs,
                                   student_model, new=True)
    except (StoreError, B.BundleError) as exc:
        raise RegistryError(str(exc)) from None
    return store.models.get(manifest.model_name)


def models_info(store: Store) -> list[dict]:
    """What ``cloud models`` lists: each model with its input shape, classes, teacher, devices, versions and
    pending uploads."""
    stats = store.models.stats()
    out = []
    for m in store.models.list():
        s = stats.get(m.model, {})
        out.append({**m.to_dict(), "devices": s.get("devices", 0), "versions": s.get("versions", 0),
                    "pending_uploads": s.get("pending", 0)})
    return out
