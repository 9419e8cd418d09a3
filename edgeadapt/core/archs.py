"""The architecture names a bundle (or a weights file) may carry; torch-free, so that `bundle verify` can check.

A bundle is data, not code (DESIGN §15). Its manifest names the architecture the cloud rebuilds in torch; a
name that is not registered here is never imported or called on the manifest's say-so (``"arch":
"os:system"`` with ``arch_kwargs {"command": ...}`` ran a command on the cloud, issue 22). A model of your
own is built only from a ``module:factory`` the operator names on the command line
(``edgeadapt cloud serve --student-model module:factory``). ``edgeadapt.models.reference.ARCHS`` holds the
builders for exactly these names (it checks so at import).
"""

from __future__ import annotations

REGISTERED_ARCHS = frozenset({"resnet_edge", "resnet_teacher", "mobilenet_tiny", "vit_tiny", "mlp_nonorm"})


def arch_problem(arch: str, student_model: str | None = None) -> str | None:
    """Why the cloud would refuse to build ``arch`` (None: it would build it)."""
    if arch in REGISTERED_ARCHS or student_model:
        return None
    return (f"arch {arch!r} is not a registered architecture ({', '.join(sorted(REGISTERED_ARCHS))}); the cloud "
            "never imports a model named only by a manifest: name its builder on the command line "
            "(edgeadapt cloud serve --student-model module:factory)")
