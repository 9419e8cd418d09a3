"""`edgeadapt doctor device|cloud`: one line per finding with what to do; exit 1 on a fatal one.

The device flavour imports no torch (it runs on the edge box)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import fail, plain, print_json

app = typer.Typer(help="Check a device or cloud setup before it runs: one line per finding, with what to do.",
                  no_args_is_help=True)


def report(findings: list, as_json: bool) -> None:
    """Print the findings (peer-provided text as plain text) and exit 1 when one is fatal."""
    from rich.console import Console

    from edgeadapt.core.findings import fatal

    if as_json:
        print_json([f.to_dict() for f in findings])
    else:
        out = Console(highlight=False)
        for f in findings:
            out.print(plain(f.line(), 2000), soft_wrap=True)
    if fatal(findings):
        raise typer.Exit(1)


@app.command("device")
def device(
    bundle: Path = typer.Option(None, help="the bundle the device runs"),
    cloud: str = typer.Option(None, "--cloud", help="the cloud's base URL (omit: standalone)"),
    token_file: Path = typer.Option(None, "--token-file", help="file holding the device token (or EDGEADAPT_TOKEN)"),
    ca_file: Path = typer.Option(None, "--ca-file", help="PEM CA bundle for an https:// cloud"),
    state_dir: Path = typer.Option(None, help="the daemon's state directory (checked when given)"),
    no_updates: bool = typer.Option(False, "--no-updates", help="the device will run with --no-updates"),
    config: Path = typer.Option(None, help="the daemon's TOML config ([device] table)"),
    as_json: bool = typer.Option(False, "--json", help="findings as JSON"),
) -> None:
    """Check a device's bundle (hashes, manifest, graphs), config, key, state directory and, with --cloud, the
    cloud: reachable, healthy, the token valid, this bundle's model served, its key, one sample's upload size."""
    from edgeadapt.device.config import ConfigError, load_config
    from edgeadapt.device.doctor import device_findings

    unset = Path(".edgeadapt-doctor-no-state-dir")  # the config needs one; checked only when really given
    flags = dict(bundle=bundle, state_dir=state_dir, cloud_url=cloud, token_file=token_file, ca_file=ca_file,
                 updates=False if no_updates else None)
    try:
        try:
            cfg = load_config(flags, config)
        except ConfigError as exc:
            if state_dir is not None or "state_dir" not in str(exc):
                raise
            cfg = load_config({**flags, "state_dir": unset}, config)
    except ConfigError as exc:
        fail(str(exc), code=1)
    report(device_findings(cfg.bundle, cfg.cloud_url, cfg.token, cfg.tls_verify(), cfg.updates,
                           None if cfg.state_dir == unset else cfg.state_dir), as_json)


@app.command("cloud")
def cloud(
    home: Path = typer.Option(None, "--home", envvar="EDGEADAPT_CLOUD_HOME", help="the cloud home"),
    bundle: Path = typer.Option(None, "--bundle", help="the bundle the devices run (default: the config's)"),
    url: str = typer.Option(None, "--url", help="where the server answers (default: from listen)"),
    as_json: bool = typer.Option(False, "--json", help="findings as JSON"),
) -> None:
    """Check a cloud home (config, signing key, admin token), its bundle (hashes, key, upload size), the store,
    free disk, the teacher, and whether the server answers."""
    from edgeadapt.cloud.doctor import cloud_findings

    report(cloud_findings(home, bundle, url), as_json)
