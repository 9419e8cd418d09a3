"""`edgeadapt bench accuracy|runtime|update|ood|load --json` — benchmarks that print machine-readable results."""

from __future__ import annotations

from pathlib import Path

import typer

from edgeadapt.cli.common import console, fail, print_json

app = typer.Typer(help="Benchmarks (FMNIST-C protocol, DESIGN §10). Each prints one JSON object with --json.",
                  no_args_is_help=True)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: the cloud and device processes a benchmark started are stopped by their
    context managers instead of being left running (holding ports and cores) when the benchmark is killed."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


@app.callback()
def _bench() -> None:
    exit_on_sigterm()


def _progress_factory():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    progress.start()

    def factory(name: str, total: int):
        task = progress.add_task(name, total=total)
        return lambda n: progress.advance(task, n)

    return progress, factory


def _assets(bundle: Path | None, stream: Path | None):
    from edgeadapt.assets import default_bundle, default_stream

    try:
        return bundle or default_bundle(console), stream or default_stream(console)
    except FileNotFoundError as exc:
        fail(str(exc))


def _teacher(teacher: str | None, weights: Path | None) -> tuple[str, Path]:
    """The operator's teacher (``module:factory`` or a reference arch, with its weights) or the reference one."""
    if teacher is None:
        if weights is not None:
            fail("--teacher-weights needs --teacher (the architecture the weights are for)")
        from edgeadapt.assets import default_teacher

        return default_teacher(console)
    if weights is None:
        fail("--teacher needs --teacher-weights (a teacher with random weights teaches nothing)")
    if not weights.is_file():
        fail(f"--teacher-weights {weights}: no such file")
    return teacher, weights


def _loop_setup(teacher: str | None, weights: Path | None, student_model: str | None, home: Path | None,
                upload_encoding: str | None) -> tuple[tuple[str, Path], Path]:
    """What the loop rows' processes need. They are started from here, so the operator's choices reach them through
    their environment: the device's upload encoding, the cloud's student model, and the current directory on
    PYTHONPATH so that a ``module:factory`` written beside the data imports in the cloud process too."""
    import os

    from edgeadapt.assets import cloud_home

    pair = _teacher(teacher, weights)
    if upload_encoding is not None:
        from edgeadapt.core.upload_encoding import UploadEncoding

        try:
            os.environ["EDGEADAPT_UPLOAD_ENCODING"] = str(UploadEncoding.parse(upload_encoding))
        except ValueError as exc:
            fail(str(exc))
    if student_model:
        os.environ["EDGEADAPT_CLOUD_STUDENT_MODEL"] = student_model
    if ":" in pair[0] or student_model:
        os.environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])
    if home is not None and not (home / "signing_key.pem").is_file():
        fail(f"--cloud-home {home}: no signing key there (edgeadapt cloud init --home {home})")
    return pair, home or cloud_home(console)


@app.command()
def accuracy(
    stream: str = typer.Option("continual", help="the setting (same images): continual, class-sorted, correlated:DELTA "
                                                 "(Dirichlet-ordered labels per domain, e.g. 0.1 or 0.01), mixed "
                                                 "(domains interleaved), gradual (severity 1->5->1 per domain), "
                                                 "recurring:K (the sequence K times)"),
    seed: int = typer.Option(0, help="seed of the stream's ordering (correlated, mixed)"),
    bundle: Path = typer.Option(None, help="bundle (default: the reference edge model, built and cached)"),
    data: Path = typer.Option(None, help="FMNIST-C stream .npz (default: built and cached)"),
    rows: str = typer.Option("source,norm_stats,device_best,tent,eata",
                             help="comma-separated rows; also loop and loop_upload_all (cloud + device processes)"),
    sync_every: int = typer.Option(8, help="loop rows: lockstep every K batches (0 = asynchronous)"),
    method: str = typer.Option(None, help="the method spec of device_best and the loop rows (default: the device's "
                                          "default, device/config.py DEFAULT_METHOD)"),
    limit: int = typer.Option(None, help="use only the first N images of each corruption (quick runs)"),
    batch: int = typer.Option(64, min=1, help="images per request (down to 1)"),
    teacher: str = typer.Option(None, help="loop rows: the cloud's teacher, a reference arch or module:factory (your "
                                           "own code, importable from the current directory or PYTHONPATH; default: "
                                           "the reference teacher)"),
    teacher_weights: Path = typer.Option(None, help="loop rows: the teacher's weights (safetensors or .pt)"),
    student_model: str = typer.Option(None, help="loop rows: the bundle's architecture as module:factory when it is "
                                                 "not a registered one (the cloud's --student-model)"),
    cloud_home: Path = typer.Option(None, help="loop rows: the cloud home whose signing key the bundle was exported "
                                               "for (default: the benchmarks' cloud home)"),
    upload_encoding: str = typer.Option(None, help="loop rows: the device's upload_encoding (raw, png, jpeg:Q, webp:Q; "
                                                   "default: the device's default)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Online accuracy of source, norm statistics, the device's best forward-only method, Tent and EATA; with the
    loop rows, of a device with the cloud in the loop (any bundle, any stream, your teacher: docs/BYO.md)."""
    from edgeadapt.bench.accuracy import DEFAULT_DEVICE_METHOD, run_accuracy_bench

    b, s = _assets(bundle, data)
    row_list = [r.strip() for r in rows.split(",") if r.strip()]
    pair = home = None
    if any(r.startswith("loop") for r in row_list):
        pair, home = _loop_setup(teacher, teacher_weights, student_model, cloud_home, upload_encoding)
    progress, factory = _progress_factory()
    try:
        res = run_accuracy_bench(b, s, stream=stream, batch=batch, rows=row_list,
                                 device_method=method or DEFAULT_DEVICE_METHOD, limit=limit,
                                 progress_factory=factory, sync_every=sync_every, teacher=pair,
                                 signing_home=home, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    finally:
        progress.stop()
    if json_out:
        print_json(res)
    else:
        for name, r in res["rows"].items():
            passes = f"  per pass {r['acc_per_pass']}" if "acc_per_pass" in r else ""
            console.print(f"{name:14s} acc {r['acc']:.4f}  upload {r['upload_frac']:.3f}  {r.get('img_s', 0):.0f} img/s"
                          f"{passes}")


@app.command()
def runtime(
    bundle: Path = typer.Option(None, help="bundle (default: the reference edge model)"),
    data: Path = typer.Option(None, help="stream .npz for realistic inputs (default: FMNIST-C for the reference "
                                         "bundle; inputs synthesized from the input spec for a bundle you give)"),
    method: str = typer.Option(None, help="adaptation method (default: the standalone device's)"),
    threads: int = typer.Option(2),
    batch: int = typer.Option(64, min=1, help="images per engine batch for the throughput figures"),
    http_batch: int = typer.Option(64, min=1, help="images per HTTP request for the latency figures (a large "
                                                   "model's 64 images can exceed the daemon's body limit)"),
    seconds: float = typer.Option(4.0, help="measuring time per throughput figure"),
    requests: int = typer.Option(200, help="HTTP requests for the latency figures"),
    torch_rows: bool = typer.Option(True, "--torch/--no-torch", help="also a torch Tent step and torch eval (needs "
                                    "the architecture: registered, or --student-model)"),
    student_model: str = typer.Option(None, help="the bundle's architecture as module:factory for the torch rows"),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="also the default and the transductive "
                                 "methods (default_img_s, transductive_img_s) when --method is neither"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Static vs adapting throughput (the default and the transductive methods), parameter swap ms, torch Tent
    step, HTTP p50/p99 latency, RSS, bundle MB — in one run."""
    from edgeadapt.bench.runtime import run_runtime_bench
    from edgeadapt.core.bundle import read_manifest
    from edgeadapt.datasets.fmnist import load_stream
    from edgeadapt.device.config import DEFAULT_METHOD, TRANSDUCTIVE_METHOD
    from edgeadapt.models.reference import ARCHS

    if bundle is None or data is not None:
        bundle, data = _assets(bundle, data)
    x = load_stream(data)["x"][:4096] if data is not None else None
    with_torch = torch_rows and (student_model is not None or read_manifest(bundle).arch in ARCHS)
    if torch_rows and not with_torch:
        console.print("torch rows skipped: the bundle's architecture is not registered here (give --student-model "
                      "module:factory, or --no-torch)")
    method = method or DEFAULT_METHOD
    extra = {k: v for k, v in (("default", DEFAULT_METHOD), ("transductive", TRANSDUCTIVE_METHOD))
             if compare and v != method}
    with console.status("measuring"):
        try:
            res = run_runtime_bench(bundle, x, method, batch=batch, threads=threads,
                                    min_s=seconds, http_requests=requests, with_torch=with_torch,
                                    http_batch=http_batch, student_model=student_model, extra_methods=extra)
        except ValueError as exc:
            fail(str(exc))
    print_json(res) if json_out else console.print(res)


@app.command()
def ood(
    json_out: bool = typer.Option(False, "--json"),
    work: Path = typer.Option(None, help="work directory for the open-set model (default: cache)"),
    split: str = typer.Option("test", help="test: the test images; dev: the held-out training images (choose "
                                           "detectors and settings here, never on the test labels)"),
    per_set: int = typer.Option(2000, help="clean images per set (in, near, far)"),
    covariate: bool = typer.Option(True, help="also the covariate-shifted stream through the adapting engine"),
    corruptions: str = typer.Option(None, help="comma-separated corruptions of the shifted stream (default: all)"),
    per_domain: int = typer.Option(400, help="in-distribution images per corruption in the shifted stream"),
    near_rate: float = typer.Option(0.05, help="near-OOD images mixed into each domain, share of per-domain"),
    far_rate: float = typer.Option(0.05, help="far-OOD inputs mixed into each domain, share of per-domain"),
    method: str = typer.Option(None, help="adaptation method of the engine (default: the standalone device's)"),
) -> None:
    """AUROC and FPR@95%TPR per OOD detector (in-dist: FMNIST classes 0-7; near: held-out 8-9; far: synthetic),
    on clean images and on a covariate-shifted stream (flag rate of the shifted in-distribution)."""
    from edgeadapt.bench.ood import run_ood_bench
    from edgeadapt.datasets.fmnist import validate_corruptions

    try:
        names = validate_corruptions(corruptions.split(",")) if corruptions else None
        with console.status("OOD benchmark"):
            res = run_ood_bench(work, per_set=per_set, split=split, covariate=covariate, corruptions=names,
                                per_domain=per_domain, near_rate=near_rate, far_rate=far_rate, method=method)
    except ValueError as exc:
        fail(str(exc))
    print_json(res) if json_out else console.print(res)


@app.command()
def update(
    json_out: bool = typer.Option(False, "--json"),
    bundle: Path = typer.Option(None, help="bundle (default: the reference edge model with rank-4 adapters)"),
    adapters: int = typer.Option(4, help="adapter rank of the default bundle (0 = BatchNorm parameters only)"),
    data: Path = typer.Option(None),
    scoring: str = typer.Option("domain", help="domain: each held-out batch of one corruption normalized with its "
                                               "own statistics, as a device uses an update; eval: the update's "
                                               "published running statistics"),
    teacher: str = typer.Option(None, help="the teacher: a reference arch or module:factory (default: the "
                                           "reference teacher)"),
    teacher_weights: Path = typer.Option(None, help="the teacher's weights (safetensors or .pt)"),
    student_model: str = typer.Option(None, help="the bundle's architecture as module:factory when it is not a "
                                                 "registered one"),
) -> None:
    """Update-package size and accuracy per compression mode (fp32, fp16, int8, int4, ecq, ternary, bitmask)."""
    from edgeadapt.assets import default_bundle
    from edgeadapt.cloud.bench_update import run_update_bench

    if bundle is None:
        bundle = default_bundle(console, adapters=adapters)
    b, s = _assets(bundle, data)
    arch, weights = _teacher(teacher, teacher_weights)
    with console.status("training an update and compressing it"):
        try:
            res = run_update_bench(b, arch, weights, s, scoring=scoring, student_model=student_model)
        except ValueError as exc:
            fail(str(exc))
    print_json(res) if json_out else console.print(res)


@app.command()
def encodings(
    data: Path = typer.Option(None, help="stream .npz of uint8 images (default: FMNIST-C)"),
    limit: int = typer.Option(100, min=1, help="first N images of each domain (corruption)"),
    rgb_size: int = typer.Option(None, help="also a synthetic RGB stream at this size: the images upscaled and "
                                            "colourized (bench/encodings.py)"),
    encodings_: str = typer.Option(",".join(("raw", "png", "jpeg:90", "jpeg:75", "webp:80")), "--encodings",
                                   help="comma-separated upload encodings"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Bytes per uploaded sample per upload encoding (payload and JSON body), encode/decode ms, lossy error."""
    from edgeadapt.bench.encodings import colourized, run_encodings_bench, stream_sample
    from edgeadapt.core.upload_encoding import UploadEncoding
    from edgeadapt.datasets.fmnist import load_stream

    names = [e.strip() for e in encodings_.split(",") if e.strip()]
    try:
        names = [str(UploadEncoding.parse(e)) for e in names]
    except ValueError as exc:
        fail(str(exc))
    if data is None:
        _, data = _assets(None, None)
    x = stream_sample(load_stream(data), limit)
    res: dict = {"stream": str(data), "limit_per_domain": limit}
    with console.status("encoding"):
        try:
            res["native"] = run_encodings_bench(x, tuple(names))
            if rgb_size:
                if x.shape[1] != 1:
                    fail("--rgb-size colourizes grey images; this stream is not grey")
                res[f"rgb{rgb_size}"] = run_encodings_bench(colourized(x, rgb_size), tuple(names))
        except ValueError as exc:
            fail(str(exc))
    if json_out:
        print_json(res)
    else:
        for part in [k for k in res if k in ("native",) or k.startswith("rgb")]:
            for enc, r in res[part]["encodings"].items():
                console.print(f"{part:8s} {enc:8s} {r['payload_bytes_mean']:10.1f} B/sample  x{r['ratio_to_raw']:.3f}"
                              f"  encode {r['encode_ms']:.2f} ms  decode {r['decode_ms']:.2f} ms")


@app.command()
def load(
    target: str = typer.Option(..., help="device (its predict routes) or cloud (POST /v1/samples)"),
    clients: int = typer.Option(50, "--clients", "--connections",
                                help="concurrent clients, each with its own keep-alive connection"),
    seconds: float = typer.Option(60.0, help="how long to keep them busy"),
    max_requests: int = typer.Option(None, help="stop after this many requests in all (device: Python client)"),
    url: str = typer.Option(None, help="a running daemon/cloud on loopback (default: start one)"),
    bundle: Path = typer.Option(None, help="bundle (input shape, model; default: the reference edge model)"),
    home: Path = typer.Option(None, help="cloud: the home that signs for the bundle (a copy is used; "
                                         "default: the benchmarks' cloud home)"),
    admin_token: str = typer.Option(None, help="cloud with --url: admin token to register the load's devices"),
    batch: int = typer.Option(None, help="images per request (default 1) or samples per upload (default 8)"),
    route: str = typer.Option("v1-npy", help="device: v1-json (base64 array), v1-npy, v1-raw (octet-stream), "
                                             "v1-image (JPEG; multipart when --batch > 1), v2-binary, v2-json"),
    client: str = typer.Option("auto", help="device: wrk (when installed), python (asyncio, its own process) or "
                                            "auto (wrk if installed and no --max-requests)"),
    engine_seconds: float = typer.Option(5.0, help="device: how long to run the engine alone afterwards"),
    device_args: str = typer.Option("", help="device: extra `edgeadapt device run` flags, e.g. '--threads 1'"),
    swaps: int = typer.Option(0, help="device: run the load again while switching this many parameter versions "
                                      "(prepared in the daemon's state dir) and compare p99 with the steady run"),
    store: str = typer.Option("sqlite", help="cloud: sqlite (embedded), postgres (a throwaway PostgreSQL + "
                                             "S3-compatible server on loopback), or both comma-separated, run one "
                                             "after the other in this run"),
    replicas: int = typer.Option(1, min=1, help="cloud: `cloud serve` processes sharing the store (postgres)"),
    devices: int = typer.Option(None, min=1, help="cloud: registered devices heartbeating and uploading in turn "
                                                  "through the connections (default: one per client)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """N concurrent clients for S seconds on loopback: requests, errors, p50/p99 latency, requests/s; for the
    device also the client's CPU share and the engine's own img/s in the same run (HTTP/engine ratio); for the
    cloud, optionally a fleet of devices on replicas sharing PostgreSQL + an object store."""
    import shlex

    from edgeadapt.bench.load import run_load_bench, run_serving_bench

    if target not in ("device", "cloud"):
        fail(f"--target must be device or cloud, not {target!r}")
    if bundle is None:
        from edgeadapt.assets import default_bundle

        bundle = default_bundle(console)
    if target == "cloud" and url is None and home is None:
        from edgeadapt.assets import cloud_home

        home = cloud_home(console)
    with console.status(f"{clients} clients for {seconds:g} s against the {target}"):
        try:
            if target == "device":
                res = run_serving_bench(bundle, route=route, batch=batch or 1, connections=clients,
                                        seconds=seconds, max_requests=max_requests, url=url, client=client,
                                        engine_seconds=engine_seconds, device_args=tuple(shlex.split(device_args)),
                                        swaps=swaps)
            else:
                runs = []
                for one in [s.strip() for s in store.split(",") if s.strip()]:
                    runs.append(run_load_bench(target, bundle, clients=clients, seconds=seconds,
                                               max_requests=max_requests, url=url, home=home,
                                               admin_token=admin_token, batch=batch, store=one,
                                               replicas=replicas if one == "postgres" else 1, devices=devices))
                res = runs[0] if len(runs) == 1 else {"runs": runs}
        except (ValueError, RuntimeError) as exc:
            fail(str(exc))
    if json_out:
        print_json(res)
    elif "runs" in res:
        for r in res["runs"]:
            console.print(f"{r['store']} x{r['replicas']}, {r['devices']} devices: {r['requests']} requests, "
                          f"{r['errors']} errors, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['req_s']} req/s, "
                          f"{r['samples_s']} samples/s")
    else:
        console.print(f"{res['requests']} requests, {res['errors']} errors, p50 {res['p50_ms']} ms, "
                      f"p99 {res['p99_ms']} ms, {res['req_s']} req/s")
        if target == "device":
            console.print(f"{res['client']} client: {res['client_cpu_share']} of the CPU the load used; engine "
                          f"alone {res['engine_img_s']} img/s at batch {res['engine_batch']}: HTTP/engine "
                          f"{res['http_engine_ratio']}")


@app.command()
def fleet(
    devices: int = typer.Option(12, min=1, help="devices (dealt round-robin into the groups)"),
    groups: int = typer.Option(3, min=1, help="true drift groups (each runs its own block of corruptions)"),
    corruptions: int = typer.Option(3, min=1, help="corruptions each group runs, one after another"),
    limit: int = typer.Option(256, min=1, help="images per device and corruption"),
    seed: int = typer.Option(0, help="seed of which images each device gets"),
    sync_every: int = typer.Option(2, min=1, help="lockstep: upload, train, update every K batches of each device"),
    rows: str = typer.Option("device_only,global,per_group", help="comma-separated rows"),
    fps: float = typer.Option(1.0, min=1e-6, help="nominal images per second per device (for CPU-s per device-hour)"),
    bundle: Path = typer.Option(None, help="bundle (default: the reference edge model)"),
    adapters: int = typer.Option(0, min=0, help="default bundle with rank-N conv adapters (0: BatchNorm only)"),
    data: Path = typer.Option(None, help="FMNIST-C stream .npz (default: built and cached)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Many devices in drift groups on one real cloud process (HTTP, lockstep): device alone vs one global lineage
    vs a lineage per group of similar devices (issue 18)."""
    from edgeadapt.assets import cloud_home, default_bundle, default_teacher
    from edgeadapt.bench.fleet import run_fleet

    b, s = _assets(bundle or (default_bundle(console, adapters=adapters) if adapters else None), data)
    arch, weights = default_teacher(console)
    home = cloud_home(console)
    progress, factory = _progress_factory()
    try:
        res = run_fleet(b, s, arch, weights, home, devices=devices, groups=groups, corruptions=corruptions,
                        limit=limit, seed=seed, sync_every=sync_every, fps=fps,
                        rows=tuple(r.strip() for r in rows.split(",") if r.strip()), progress_factory=factory)
    except ValueError as exc:
        fail(str(exc))
    finally:
        progress.stop()
    if json_out:
        print_json(res)
    else:
        for name, r in res["rows"].items():
            extra = f"  train {r['train_cpu_s_per_device_hour']} CPU-s/device-h" if "train_cpu_s" in r else ""
            console.print(f"{name:12s} acc {r['acc']:.4f}  per group {r['acc_per_group']}{extra}")
        if "targets" in res:
            console.print(res["targets"])


@app.command("round")
def round_(
    executors: str = typer.Option("inprocess,ray", help="comma-separated: inprocess, ray"),
    uploads: int = typer.Option(256, min=1, help="new uploads per round (the default train_every)"),
    rounds: int = typer.Option(3, min=1, help="rounds per executor (the first on Ray includes a cold worker)"),
    torch_threads: int = typer.Option(1, min=1, help="torch threads of the trainer, in both executors"),
    ray_address: str = typer.Option(None, help="a Ray cluster (default: a local Ray started for the run)"),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """One training round's cost in-process vs as a Ray task (trainer.executor), on the reference bundle and
    teacher with the default trainer config (issue 18)."""
    from edgeadapt.assets import cloud_home, default_teacher
    from edgeadapt.bench.round import run_round_bench

    b, s = _assets(None, None)
    arch, weights = default_teacher(console)
    names = tuple(e.strip() for e in executors.split(",") if e.strip())
    bad = [e for e in names if e not in ("inprocess", "ray")]
    if bad or not names:
        fail(f"--executors: {', '.join(bad) or 'none given'}; use inprocess and/or ray")
    res = run_round_bench(b, s, arch, weights, cloud_home(console), names, uploads=uploads, rounds=rounds,
                          torch_threads=torch_threads, ray_address=ray_address)
    if json_out:
        print_json(res)
    else:
        for name, r in res["executors"].items():
            console.print(f"{name:10s} setup {r['setup_s']} s, first round {r['first_round_s']} s, "
                          f"warm round {r['warm_round_s']} s")
