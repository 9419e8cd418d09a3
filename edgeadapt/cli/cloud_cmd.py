"""`edgeadapt cloud ...` commands: init, serve, models, devices, push, rollouts, versions, groups, train.

Several models per cloud (issue 18): `cloud models add` registers a bundle and its teacher, `cloud devices add
NAME --model M` registers a device for one; commands about one model's versions take --model (default: the only
model registered, an error when several are).

Admin commands open the cloud's store directly (SQLite in WAL mode, safe while `cloud serve` runs, or the
configured PostgreSQL + object store); `train`
talks to the running server over HTTP with the admin token from the cloud home.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.text import Text

from edgeadapt.cli.common import console, fail, plain, print_json

app = typer.Typer(help="The cloud service: ingest uploads, distill a teacher, push signed updates.",
                  no_args_is_help=True)
devices_app = typer.Typer(help="List devices (no subcommand), add or revoke them.", invoke_without_command=True)
app.add_typer(devices_app, name="devices")
models_app = typer.Typer(help="List the models this cloud serves (no subcommand), or register one (add).",
                         invoke_without_command=True)
app.add_typer(models_app, name="models")

HomeOpt = typer.Option(None, "--home", envvar="EDGEADAPT_CLOUD_HOME",
                       help="cloud home directory (default ~/.edgeadapt/cloud)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")
ModelOpt = typer.Option(None, "--model", help="the registered model (`cloud models`) this is about (default: the "
                                              "only one; required when several are registered)")


def _config(home: Path | None, overrides: dict | None = None):
    from edgeadapt.cloud.config import ConfigError, load_config

    try:
        return load_config(home, overrides)
    except ConfigError as exc:
        fail(str(exc))


def _store(home: Path | None):
    """The home's store; created on first use once the home exists (devices can be added before the first
    serve), refused when there is no cloud home at all."""
    from edgeadapt.cloud.admin import open_store, store_dir
    from edgeadapt.cloud.config import resolve_home
    from edgeadapt.core.signing import PRIVATE_KEY_FILE

    cfg = _config(home)
    path = store_dir(home, cfg)
    h = resolve_home(home)
    if not (path / "cloud.db").exists() and not (h / PRIVATE_KEY_FILE).is_file():
        fail(f"no cloud home at {h}: create it with `edgeadapt cloud init {h}`")
    return open_store(home, cfg)


def _model_store(store, model: str | None):
    """The store's view of the model a command names (default: the only one registered)."""
    from edgeadapt.cloud.store import StoreError

    try:
        return store.scoped(store.models.resolve(model))
    except StoreError as exc:
        fail(str(exc))


def _age(iso: str | None) -> str:
    if iso is None:
        return "never"
    t = time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    s = max(0, time.time() - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"


@app.command("init")
def init(directory: Path = typer.Argument(..., help="the cloud home to create"),
         force: bool = typer.Option(False, "--force", help="replace an existing signing key"),
         as_json: bool = JsonOpt) -> None:
    """Create a cloud home: ed25519 signing key pair (private key 0600), admin token, config.toml."""
    from edgeadapt.cloud.admin import HomeError, init_home

    try:
        info = init_home(directory, force=force)
    except HomeError as exc:
        fail(str(exc))
    if as_json:
        print_json(info)
        return
    console.print(f"cloud home [bold]{info['home']}[/] created")
    console.print(f"  signing key     {info['private_key']} (fingerprint {info['fingerprint']})")
    console.print(f"  public key      {info['public_key']}")
    console.print(f"  admin token     {info['admin_token_file']}")
    console.print(f"  config          {info['config']}")
    # a command that runs as printed once NAME and BUNDLE are filled in (tests/test_health_truth.py runs it)
    console.print("export bundles for this cloud with:",
                  Text(f"edgeadapt export --arch NAME --out BUNDLE --cloud-key {info['public_key_file']}",
                       style="bold"), soft_wrap=True)
    console.print("then serve them:", Text(f"edgeadapt cloud serve --home {info['home']} --bundle BUNDLE",
                                             style="bold"), soft_wrap=True)


@app.command("serve")
def serve(
    home: Path = HomeOpt,
    bundle: Path = typer.Option(None, "--bundle", help="the bundle the devices run"),
    teacher: str = typer.Option(None, "--teacher", help="teacher: reference arch name or package.module:factory"),
    teacher_weights: Path = typer.Option(None, "--teacher-weights", help=".safetensors or .pt state dict"),
    student_model: str = typer.Option(None, "--student-model",
                                      help="package.module:factory that builds the bundle's model, for a bundle "
                                           "exported with --model (a manifest's arch is never imported by itself)"),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve HTTPS"),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    listen: str = typer.Option(None, "--listen", help="HOST:PORT (default 127.0.0.1:8700)"),
    update_mode: str = typer.Option(None, "--update-mode", help="fp32 | fp16 | int8 | ternary | bitmask_fp16"),
    auto_rollout: bool = typer.Option(None, "--auto-rollout/--no-auto-rollout",
                                      help="publish gated versions to all devices"),
    train_every: int = typer.Option(None, "--train-every", help="train when this many uploads are pending"),
    train_interval: float = typer.Option(None, "--train-interval", help="... or after this many seconds"),
    no_trainer: bool = typer.Option(False, "--no-trainer", help="store uploads only; train via the admin API"),
    seed: int = typer.Option(None, "--seed"),
    log_level: str = typer.Option(None, "--log-level"),
    database_url: str = typer.Option(None, "--database-url",
                                     help="postgresql://USER:PASSWORD@HOST:PORT/DB shared by replicas (default: "
                                          "SQLite in the store directory; EDGEADAPT_CLOUD_DATABASE_URL keeps the "
                                          "password off the command line)"),
    blob_url: str = typer.Option(None, "--blob-url", help="s3://BUCKET/PREFIX or a directory for uploads, "
                                                          "parameters and packages (default: <store>/blobs)"),
    blob_endpoint_url: str = typer.Option(None, "--blob-endpoint-url",
                                          help="endpoint of a non-AWS S3-compatible store, e.g. http://minio:9000"),
) -> None:
    """Run the cloud service (HTTP API, trainer thread) until interrupted. --bundle (and --teacher) is registered
    as the first model; models added with `cloud models add` are served too."""
    from edgeadapt.cloud.config import ConfigError

    trainer = {"train_every": train_every, "train_interval_s": train_interval, "seed": seed}
    if no_trainer:
        trainer["enabled"] = False
    cfg = _config(home, {"bundle": str(bundle) if bundle else None, "teacher": teacher,
                         "teacher_weights": str(teacher_weights) if teacher_weights else None, "listen": listen,
                         "student_model": student_model, "tls_cert": str(tls_cert) if tls_cert else None,
                         "tls_key": str(tls_key) if tls_key else None,
                         "update_mode": update_mode, "auto_rollout": auto_rollout, "log_level": log_level,
                         "database_url": database_url, "blob_url": blob_url, "blob_endpoint_url": blob_endpoint_url,
                         "trainer": trainer})
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from edgeadapt.cloud.server import serve as run_server
    from edgeadapt.cloud.service import CloudService
    from edgeadapt.core.bundle import BundleError

    try:
        service = CloudService(cfg, home)
    except (ConfigError, BundleError, ValueError, OSError) as exc:  # ModelError (unregistered arch) is a ValueError
        fail(str(exc))
    console.print(f"serving model [bold]{escape(service.model_name)}[/] on {cfg.scheme}://{cfg.listen} "
                  f"(latest version {service.store.latest_version()}, updates {cfg.update_mode}, "
                  f"trainer {'on' if service.trainer and cfg.trainer.enabled else 'off'}; store: "
                  f"{escape(service.store.describe())})")
    others = [m for m in service.models if m != service.model_name]
    if others:
        console.print(f"also serving registered model(s) {escape(', '.join(others))}")
    for name, (_, why) in service.model_errors.items():
        console.print(f"[bold yellow]warning:[/] registered model {escape(name)} cannot be served:", Text(why))
    run_server(service, log_level=cfg.log_level)


@devices_app.callback()
def devices(ctx: typer.Context, home: Path = HomeOpt, as_json: bool = JsonOpt,
            stale_after: float = typer.Option(None, "--stale-after", min=0.001,
                                              help="seconds after which a heartbeat is stale (default: the "
                                                   "config's device_stale_after_s, 600)")) -> None:
    """List devices: the version each runs, the version and rollout assigned to it, when it was last seen, and
    what is wrong (its degraded reasons, a stale heartbeat, a revoked token)."""
    ctx.obj = {"home": home}
    if ctx.invoked_subcommand is not None:
        return
    from edgeadapt.cloud.admin import devices_info

    rows = devices_info(_store(home), stale_after or _config(home).device_stale_after_s)
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="devices")
    for col in ("name", "model", "version", "assigned", "rollout", "last seen", "status", "what is wrong"):
        table.add_column(col)
    for r in rows:  # name and status come from the store, status and problems from the device: plain text only
        ro = r["rollout"]
        table.add_row(plain(r["name"], 64), plain(r["model"] or "-", 64),
                      str(r["version"] if r["version"] is not None else "-"),
                      str(r["target_version"] if r["target_version"] is not None else "-"),
                      "-" if ro is None else plain(f"#{ro['id']} {ro['scope']}", 80), _age(r["last_seen"]),
                      plain(r["status"]), plain("; ".join(r["trouble"]), 2000))
    Console(width=max(160, Console().width)).print(table)


def _home(ctx: typer.Context, home: Path | None) -> Path | None:
    return home or (ctx.obj or {}).get("home")


@devices_app.command("add")
def devices_add(ctx: typer.Context, name: str = typer.Argument(...), home: Path = HomeOpt,
                expires_days: float = typer.Option(None, "--expires-days",
                                                   help="the token stops working after this many days "
                                                        "(default: until revoked)"),
                model: str = typer.Option(None, "--model", help="the registered model it runs (`cloud models`); "
                                          "default: the only one, required when several are registered (before "
                                          "any is: the first one registered)"),
                as_json: bool = JsonOpt) -> None:
    """Register a device for a model and print its token (once: only its hash is stored). The device's uploads,
    heartbeats and update checks are judged by that model's input contract and answered from its versions."""
    from edgeadapt.cloud.admin import _iso
    from edgeadapt.cloud.store import StoreError

    store = _store(_home(ctx, home))
    try:
        token = store.add_device(name, None if expires_days is None else expires_days * 86400, model)
    except StoreError as exc:
        fail(str(exc))
    dev = store.get_device(name)
    expires = _iso(dev.expires)
    if as_json:
        print_json({"name": name, "model": dev.model, "token": token, "expires": expires})
    else:
        console.print(f"device [bold]{escape(name)}[/] added" + (f" for model [bold]{escape(dev.model)}[/]"
                                                                 if dev.model else "") +
                      f"; its token (shown only now{f', valid until {expires}' if expires else ''}):")
        typer.echo(token)


@devices_app.command("revoke")
def devices_revoke(ctx: typer.Context, name: str = typer.Argument(...), home: Path = HomeOpt) -> None:
    """Revoke a device's token: its requests get 401 from now on."""
    from edgeadapt.cloud.store import StoreError

    try:
        _store(_home(ctx, home)).revoke_device(name)
    except StoreError as exc:
        fail(str(exc))
    console.print(f"device [bold]{name}[/] revoked")


@models_app.callback()
def models(ctx: typer.Context, home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """List the models this cloud serves: input shape, classes, teacher, devices registered, versions, pending
    uploads. The configured bundle (`cloud serve --bundle`) is registered at each start; `cloud models add`
    registers more."""
    ctx.obj = {"home": home}
    if ctx.invoked_subcommand is not None:
        return
    from edgeadapt.cloud.registry import models_info

    rows = models_info(_store(home))
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no model registered yet: `edgeadapt cloud serve --bundle BUNDLE` or `edgeadapt cloud models "
                      "add --bundle BUNDLE --teacher ARCH`")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="models")
    for col in ("model", "input shape", "classes", "devices", "versions", "pending uploads", "teacher", "bundle"):
        table.add_column(col)
    for r in rows:
        table.add_row(plain(r["model"], 64), "x".join(str(d) for d in r["input_shape"]), str(r["num_classes"]),
                      str(r["devices"]), str(r["versions"]), str(r["pending_uploads"]),
                      plain(r["teacher"] or "- (uploads stored only)", 120), plain(r["bundle"], 300))
    Console(width=max(140, Console().width)).print(table)


@models_app.command("add")
def models_add(
    ctx: typer.Context,
    bundle: Path = typer.Option(..., "--bundle", help="the bundle its devices run (exported with --cloud-key "
                                "<home>/signing_key.pub); its model name is the model's id"),
    teacher: str = typer.Option(..., "--teacher", help="the teacher that trains its devices' versions: a "
                                "reference arch name (e.g. resnet_teacher) or package.module:factory"),
    teacher_weights: Path = typer.Option(None, "--teacher-weights", help="the teacher's .safetensors or .pt state "
                                         "dict"),
    teacher_kwargs: str = typer.Option(None, "--teacher-kwargs", help='JSON object passed to the teacher\'s '
                                       'factory, e.g. \'{"num_classes": 100, "in_ch": 3}\''),
    student_model: str = typer.Option(None, "--student-model", help="package.module:factory that builds the "
                                      "bundle's model, for a bundle exported with --model"),
    home: Path = HomeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Register a model: a bundle and its teacher. Checked first: the bundle verifies and was exported for this
    cloud's key, its architecture rebuilds, the teacher builds with its weights and gives the bundle's number of
    classes. A running `cloud serve` serves it from its devices' first request."""
    import json as _json

    from edgeadapt.cloud.registry import RegistryError, add_model
    from edgeadapt.core import signing

    home = _home(ctx, home)
    kwargs = None
    if teacher_kwargs:
        try:
            kwargs = _json.loads(teacher_kwargs)
        except ValueError as exc:
            fail(f"--teacher-kwargs is not JSON: {exc}")
        if not isinstance(kwargs, dict):
            fail("--teacher-kwargs must be a JSON object")
    store = _store(home)
    from edgeadapt.cloud.config import resolve_home

    try:
        key = signing.public_key_b64(signing.load_private_key(resolve_home(home)))
    except signing.SigningKeyError:
        key = None  # a store without this home's key (shared store): checked by the serving cloud at load
    try:
        rec = add_model(store, bundle, teacher, teacher_weights, kwargs, student_model, key)
    except RegistryError as exc:
        fail(str(exc))
    if as_json:
        print_json(rec.to_dict())
        return
    console.print(f"model [bold]{escape(rec.model)}[/] registered: input {'x'.join(map(str, rec.input_shape))}, "
                  f"{rec.num_classes} classes, teacher {escape(rec.teacher or '-')}; add its devices with "
                  f"`edgeadapt cloud devices add NAME --model {escape(rec.model)}`")


@app.command("push")
def push(
    home: Path = HomeOpt,
    version: int = typer.Option(None, "--version", help="version to roll out (default: latest)"),
    devices: str = typer.Option(None, "--devices", help="comma-separated device names"),
    fraction: float = typer.Option(None, "--fraction", help="a deterministic fraction of devices, e.g. 0.1"),
    revert: bool = typer.Option(False, "--revert", help="republish an older version as a new one (roll back)"),
    group: int = typer.Option(None, "--group", help="a group of similar devices (`cloud groups`): its members, "
                                                    "whoever they are then"),
    model: str = ModelOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Roll a version out to some devices, a fraction of them, one group (a group's rollback: --group G --version
    V --revert), or (default) all."""
    from edgeadapt.cloud.admin import push as do_push
    from edgeadapt.cloud.store import StoreError

    if sum(x is not None for x in (devices or None, fraction, group)) > 1:
        fail("use one of --devices, --fraction or --group")
    names = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    try:
        out = do_push(_model_store(_store(home), model), version, names, fraction, revert, group)
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        print_json(out)
    else:
        scope = ",".join(names) if names else f"{fraction:g} of devices" if fraction else \
            f"group {group}" if group is not None else "all devices"
        console.print(f"rollout {out['rollout']}: model {out['model']!r} version {out['version']} -> {scope} "
                      f"({out['note']})")


@app.command("groups")
def groups(home: Path = HomeOpt, as_json: bool = JsonOpt,
           regroup: bool = typer.Option(False, "--regroup", help="split groups that drifted apart and merge groups "
                                                                  "that converged now (the trainer does it before "
                                                                  "each round)"),
           model: str = ModelOpt) -> None:
    """List groups of similar devices (issue 18; `groups.enabled`): members, the version the group's lineage is at,
    the version its rollouts assign, and its accuracy proxy (mean prediction entropy its members report)."""
    from edgeadapt.cloud.grouping import Grouper

    grouper = Grouper(_model_store(_store(home), model), _config(home).groups)
    changes = grouper.regroup() if regroup else []
    rows = grouper.describe()
    if as_json:
        print_json({"groups": rows, "regrouped": changes} if regroup else rows)
        return
    from rich.table import Table

    for c in changes:
        console.print(plain(c, 400))
    table = Table(title="groups")
    for col in ("group", "members", "version", "assigned", "mean entropy", "spread", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), plain(", ".join(r["members"]), 2000), str(r["version"]),
                      "-" if r["target_version"] is None else str(r["target_version"]),
                      "-" if r["mean_entropy"] is None else f"{r['mean_entropy']:.3f}", f"{r['spread']:.3f}",
                      plain(r["note"], 200))
    console.print(table)


@app.command("rollouts")
def rollouts(home: Path = HomeOpt, as_json: bool = JsonOpt) -> None:
    """List rollouts, newest last (the newest rollout covering a device decides its version)."""
    from edgeadapt.cloud.admin import rollouts_info

    rows = rollouts_info(_store(home))
    if as_json:
        print_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rollouts")
    for col in ("id", "model", "version", "scope", "created", "note"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), plain(r["model"], 64), str(r["version"]), r["scope"], r["created"] or "",
                      r["note"])
    Console().print(table)


@app.command("versions")
def versions(home: Path = HomeOpt, as_json: bool = JsonOpt,
             model: str = typer.Option(None, "--model", help="one registered model's (default: every model's)")
             ) -> None:
    """List published versions (numbered per model) and the candidates the gate rejected."""
    from edgeadapt.cloud.admin import versions_info

    store = _store(home)
    info = versions_info(store if model is None else _model_store(store, model))
    if as_json:
        print_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="versions")
    for col in ("model", "version", "parent", "created", "note", "gate (current -> candidate)"):
        table.add_column(col)
    for v in info["versions"]:
        g = v["metrics"].get("gate", {})
        gate = f"{g['current']:.3f} -> {g['candidate']:.3f}" if g.get("current") is not None else ""
        table.add_row(plain(v["model"], 64), str(v["version"]), str(v["parent"] if v["parent"] is not None else "-"), v["created"] or "",
                      v["note"], gate)
    Console().print(table)
    rejected = [c for c in info["candidates"] if c["status"] == "rejected"]
    if rejected:
        console.print(f"{len(rejected)} rejected candidate(s):")
        for c in rejected:
            console.print(f"  #{c['id']} (base v{c['base_version']}, {c['created']}):", plain(c["reason"], 1000))


@app.command("train")
def train(home: Path = HomeOpt, url: str = typer.Option(None, "--url", help="server URL (default: from listen)"),
          ca_file: Path = typer.Option(None, "--ca-file", help="CA that verifies an HTTPS server (default: the "
                                       "configured tls_cert itself, then the system trust store)"),
          model: str = typer.Option(None, "--model", help="train this registered model (default: the configured "
                                    "one, the --bundle of `cloud serve`)"),
          as_json: bool = JsonOpt) -> None:
    """Ask the running server to train on everything pending now (admin API)."""
    import ssl

    import httpx

    from edgeadapt.cloud.admin import HomeError, read_admin_token

    cfg = _config(home)
    try:
        token = read_admin_token(home)
    except HomeError as exc:
        fail(str(exc))
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    base = url or f"{cfg.scheme}://{host}:{cfg.port}"
    verify: ssl.SSLContext | bool = True
    if ca_file or cfg.tls_cert:
        verify = ssl.create_default_context(cafile=str(ca_file or Path(cfg.tls_cert).expanduser()))
        if not ca_file:  # the server's own certificate as the trust anchor
            verify.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    try:
        from urllib.parse import quote

        path = "/v1/admin/train" if model is None else f"/v1/admin/models/{quote(model, safe='')}/train"
        r = httpx.post(base.rstrip("/") + path, headers={"Authorization": f"Bearer {token}"},
                       timeout=3600, verify=verify)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the cloud at {base}: {exc}")
    if r.status_code != 200:
        fail(f"HTTP {r.status_code}: {r.text[:500]}")
    out = r.json()
    if as_json:
        print_json(out)
    else:
        console.print(f"{out['status']}: base v{out['base_version']} -> "
                      f"{'v' + str(out['version']) if out['version'] is not None else '-'} "
                      f"({out['samples']} uploads, {out['steps']} steps) {out['reason']}")
