"""`edgeadapt cloud ...` commands and the layered config, with the server running (SQLite WAL shared)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeadapt.cli import app
from edgeadapt.cloud.config import ConfigError, load_config

pytest_plugins = ["tests.cloud_fixtures"]  # the cloud fixtures (cloud_env, live_cloud)
pytestmark = pytest.mark.timeout(300)  # includes building the shared trained-bundle fixture on a loaded machine
runner = CliRunner()


def _run(args: list[str], env: dict | None = None):
    return runner.invoke(app, args, env=env)


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long error lines


def test_init(tmp_path):
    home = tmp_path / "home"
    r = _run(["cloud", "init", str(home), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert (home / "signing_key.pem").stat().st_mode & 0o777 == 0o600
    assert (home / "admin_token").stat().st_mode & 0o777 == 0o600
    assert (home / "config.toml").is_file()
    from edgeadapt.core.signing import load_public_key_b64

    assert load_public_key_b64(home) == info["public_key"] == load_public_key_b64(home / "signing_key.pub")
    r = _run(["cloud", "init", str(home)])
    assert r.exit_code != 0 and "already exists" in _text(r)
    assert _run(["cloud", "init", str(home), "--force"]).exit_code == 0
    load_config(home, environ={})  # the written default config is valid


def test_config_layers(tmp_path):
    home = tmp_path
    (home / "config.toml").write_text('[cloud]\nlisten = "0.0.0.0:9000"\nupdate_mode = "int8"\n'
                                      '[cloud.trainer]\nlr = 0.01\ntrain_every = 10\n')
    cfg = load_config(home, environ={})
    assert (cfg.port, cfg.update_mode, cfg.trainer.lr, cfg.trainer.train_every) == (9000, "int8", 0.01, 10)
    env = {"EDGEADAPT_CLOUD_UPDATE_MODE": "fp16", "EDGEADAPT_CLOUD_TRAINER__LR": "0.002",
           "EDGEADAPT_CLOUD_UPDATE_OPTS": '{"density": 0.2}'}
    cfg = load_config(home, environ=env)
    assert (cfg.update_mode, cfg.trainer.lr, cfg.trainer.train_every, cfg.update_opts) == ("fp16", 0.002, 10,
                                                                                           {"density": 0.2})
    cfg = load_config(home, {"update_mode": "ternary", "trainer": {"lr": 0.5, "seed": None}}, environ=env)
    assert (cfg.update_mode, cfg.trainer.lr) == ("ternary", 0.5)
    with pytest.raises(ConfigError, match=r"trainer\.lr.*greater than 0.*environment"):
        load_config(home, environ={"EDGEADAPT_CLOUD_TRAINER__LR": "-1"})
    with pytest.raises(ConfigError, match=r"update_mode.*command line"):
        load_config(home, {"update_mode": "zip"}, environ={})
    with pytest.raises(ConfigError, match=r"bogus.*Extra inputs"):
        load_config(home, environ={"EDGEADAPT_CLOUD_BOGUS": "1"})
    (home / "config.toml").write_text("[cloud\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(home, environ={})


def test_admin_commands_with_server_running(live_cloud, cloud_env, kit):
    cloud = live_cloud(auto_rollout=False)
    env = {"EDGEADAPT_CLOUD_HOME": str(cloud_env.home),
           "EDGEADAPT_CLOUD_STORE_DIR": str(cloud.service.store.root)}
    r = _run(["cloud", "devices", "add", "cam-7", "--json"], env)
    assert r.exit_code == 0, r.output
    token = json.loads(r.stdout)["token"]
    with cloud.client(token) as c:  # the server sees the device the CLI added
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(3))).status_code == 200
        assert c.post("/v1/heartbeat", json={"model": "fmnist-edge", "param_version": 0}).status_code == 200
    r = _run(["cloud", "devices", "--json"], env)
    (dev,) = json.loads(r.stdout)
    assert dev["name"] == "cam-7" and dev["version"] == 0 and dev["last_seen"] and dev["target_version"] is None
    assert "cam-7" in _run(["cloud", "devices"], env).stdout  # the table
    p0 = cloud.service.store.get_params(0)
    assert cloud.service.trainer.submit_candidate({k: v + 0.01 for k, v in p0.items()}).version == 1
    with cloud.client(token) as c:
        assert c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0}).status_code == 204
    r = _run(["cloud", "push", "--devices", "cam-7", "--json"], env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 1
    with cloud.client(token) as c:
        r2 = c.get("/v1/updates", params={"model": "fmnist-edge", "have": 0})
        assert r2.status_code == 200 and r2.headers["x-edgeadapt-version"] == "1"
    # roll back by republishing v0 as v2
    r = _run(["cloud", "push", "--version", "0", "--revert", "--json"], env)
    assert json.loads(r.stdout)["version"] == 2
    assert np.array_equal(cloud.service.store.get_params(2)["layers.0.bn1.weight"], p0["layers.0.bn1.weight"])
    assert _run(["cloud", "push", "--version", "9"], env).exit_code != 0
    assert _run(["cloud", "push", "--devices", "nope"], env).exit_code != 0
    rollouts = json.loads(_run(["cloud", "rollouts", "--json"], env).stdout)
    assert [r_["version"] for r_ in rollouts] == [1, 2]
    versions = json.loads(_run(["cloud", "versions", "--json"], env).stdout)
    assert [v["version"] for v in versions["versions"]] == [0, 1, 2]
    assert _run(["cloud", "versions"], env).exit_code == 0
    r = _run(["cloud", "train", "--url", cloud.url, "--json"], env)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] in ("published", "rejected", "idle")
    assert _run(["cloud", "devices", "revoke", "cam-7"], env).exit_code == 0
    with cloud.client(token) as c:
        assert c.post("/v1/samples", json=kit.batch_body(kit.synthetic_images(1))).status_code == 401


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(cloud_env, tmp_path):
    port = _free_port()
    env = {**os.environ, "EDGEADAPT_CLOUD_STORE_DIR": str(tmp_path / "store")}
    cmd = [sys.executable, "-c", "from edgeadapt.cli import main; main()", "cloud", "serve", "--home",
           str(cloud_env.home), "--bundle", str(cloud_env.bundle), "--teacher", "resnet_edge", "--teacher-weights",
           str(cloud_env.teacher_weights), "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.2)
        assert r.json()["model"] == "fmnist-edge" and r.json()["trainer"] is True
        assert "edgeadapt_cloud_samples_received_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        proc.terminate()
        proc.wait(20)
    # a bad config is a clean error, not a traceback
    r = _run(["cloud", "serve", "--home", str(cloud_env.home), "--bundle", str(cloud_env.bundle),
              "--update-mode", "zip"], {"EDGEADAPT_CLOUD_STORE_DIR": str(tmp_path / "store")})
    assert r.exit_code == 2 and "update_mode" in _text(r)
