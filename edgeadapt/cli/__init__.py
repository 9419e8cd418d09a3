"""The `edgeadapt` command: one verb per job. Each command is thin and calls the library.

Heavy imports (torch, onnx) happen inside the commands that need them, so `edgeadapt device ...` runs on
an edge box without torch.
"""

from __future__ import annotations

import typer

from edgeadapt.cli import (
    bench_cmd,
    bundle_cmd,
    cloud_cmd,
    data_cmd,
    demo_cmd,
    device_cmd,
    doctor_cmd,
    export_cmd,
    train_cmd,
)

app = typer.Typer(
    name="edgeadapt",
    help="Edge continual adaptation: export a model to a device, adapt it online, push updates from the cloud.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_cmd.app, name="data")
app.command("train")(train_cmd.train)
app.command("export")(export_cmd.export)
app.add_typer(bundle_cmd.app, name="bundle")
app.add_typer(device_cmd.app, name="device")
app.add_typer(cloud_cmd.app, name="cloud")
app.add_typer(bench_cmd.app, name="bench")
app.add_typer(doctor_cmd.app, name="doctor")
app.command("demo")(demo_cmd.demo)


def main() -> None:
    app()
