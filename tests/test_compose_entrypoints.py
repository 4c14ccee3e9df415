"""The compose containers' entry points, in-process (the real stack is tests/compose/).

shopmesh.sidecar renders a pod's Envoy config for compose; shopmesh.ca_pod
keeps a join token and the bundle in each pod's join volume;
shopmesh.aws_profile decides the backends; shopmesh.healthcheck judges a
sidecar by Envoy's readiness and the agent's status file.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from pki.tokens import JoinTokenStore
from shopmesh import aws_profile, ca_pod, healthcheck, sidecar, topology


def test_sidecar_config_reaches_pods_by_service_name(tmp_path: Path) -> None:
    path = sidecar.render_config("orders", tmp_path, ttl_s=20.0, otlp="jaeger:4317")
    config = yaml.safe_load(path.read_text())
    listeners = {l["name"]: l["address"]["socket_address"] for l in config["static_resources"]["listeners"]}
    assert listeners["inbound"] == {"address": "0.0.0.0", "port_value": topology.INBOUND_PORT}
    # Outbound listeners and admin stay on the pod's loopback.
    assert listeners["outbound-search"]["address"] == "127.0.0.1"
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    search = clusters["search"]
    assert search["type"] == "STRICT_DNS"
    endpoint = search["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint == {"address": "search", "port_value": topology.INBOUND_PORT}
    assert clusters["local-app"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"]["address"] == "127.0.0.1"
    assert clusters["otel-collector"]["type"] == "STRICT_DNS"


def test_ingress_config_listens_on_every_interface_of_its_container(tmp_path: Path) -> None:
    config = yaml.safe_load(sidecar.render_config("ingress", tmp_path, ttl_s=300.0, otlp=None).read_text())
    [external] = [l for l in config["static_resources"]["listeners"] if l["name"] == "external"]
    assert external["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": topology.INGRESS_PORT}
    assert "otel-collector" not in {c["name"] for c in config["static_resources"]["clusters"]}


def test_sidecar_agent_flags(tmp_path: Path) -> None:
    args = sidecar.parse_args(["payments", "--join-dir", str(tmp_path / "join"), "--ttl", "20s"])
    argv = sidecar.agent_argv(args, tmp_path / "envoy.yaml")
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags["--spiffe-id"] == "spiffe://shopmesh.internal/ns/shop/sa/payments"
    assert flags["--join-token-file"] == str(tmp_path / "join" / "join-token")
    assert flags["--bundle-file"] == str(tmp_path / "join" / "root.pem")
    assert flags["--app-health"] == f"127.0.0.1:{topology.APP_PORT}"
    assert flags["--envoy-admin"] == f"127.0.0.1:{topology.ADMIN_PORT}"
    assert "--app-health" not in sidecar.agent_argv(sidecar.parse_args(["ingress"]), tmp_path / "e.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["orders", "--ttl", "soon"], "argument --ttl"),
        (["orders", "--ca-join", "ca"], "argument --ca-join"),
        (["nobody"], "invalid choice: 'nobody'"),
    ],
)
def test_sidecar_refuses_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        sidecar.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _keeper(tmp_path: Path, token_ttl_s: float = 600.0) -> ca_pod.Keeper:
    state = tmp_path / "state"
    (state / "ca").mkdir(parents=True)
    JoinTokenStore(state)
    pods = []
    for name in topology.WORKLOADS:
        (tmp_path / "join" / name).mkdir(parents=True)
        pods.append(ca_pod.PodJoinDir(name, tmp_path / "join" / name))
    return ca_pod.Keeper(state, pods, token_ttl_s, tmp_path / "keeper.json")


def test_keeper_waits_for_the_bundle_then_stocks_every_pod(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path)
    keeper.tick(time.time())
    status = json.loads((tmp_path / "keeper.json").read_text())
    assert sorted(status["waiting"]) == sorted(topology.WORKLOADS)
    assert not any((tmp_path / "join" / name / "join-token").exists() for name in topology.WORKLOADS)

    (tmp_path / "state" / "ca" / "root.pem").write_text("BUNDLE v1\n")
    keeper.tick(time.time())
    assert json.loads((tmp_path / "keeper.json").read_text())["waiting"] == []
    store = JoinTokenStore(tmp_path / "state")
    for name in topology.WORKLOADS:
        join = tmp_path / "join" / name
        assert (join / "root.pem").read_text() == "BUNDLE v1\n"
        token_file = join / "join-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        # Each token is bound to its own pod's identity: it redeems for it.
        assert store.redeem(token_file.read_text().strip(), topology.spiffe_id_for(name)) == topology.spiffe_id_for(name)


def test_keeper_replaces_spent_and_aging_tokens_and_republishes_the_bundle(tmp_path: Path) -> None:
    keeper = _keeper(tmp_path, token_ttl_s=100.0)
    (tmp_path / "state" / "ca" / "root.pem").write_text("BUNDLE v1\n")
    now = time.time()
    keeper.tick(now)
    orders = tmp_path / "join" / "orders" / "join-token"
    search = tmp_path / "join" / "search" / "join-token"
    first_orders, first_search = orders.read_text(), search.read_text()

    orders.unlink()  # the agent spent it
    keeper.tick(now + 10)
    assert orders.read_text() != first_orders
    assert search.read_text() == first_search  # still fresh: left alone

    keeper.tick(now + 60)  # past half the token TTL
    assert search.read_text() != first_search

    (tmp_path / "state" / "ca" / "root.pem").write_text("BUNDLE v2\n")  # CA rotation
    keeper.tick(now + 61)
    assert (tmp_path / "join" / "payments" / "root.pem").read_text() == "BUNDLE v2\n"


def test_ca_pod_refuses_a_missing_join_volume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "join" / "orders").mkdir(parents=True)
    with pytest.raises(SystemExit):
        ca_pod.parse_args(["--state-dir", str(tmp_path / "state"), "--join-root", str(tmp_path / "join")])
    err = capsys.readouterr().err
    assert "no join volume for" in err and "ingress" in err and "orders" not in err.split("no join volume for")[1].split("under")[0]


def test_aws_profile_switches_only_when_compose_profiles_name_it() -> None:
    assert aws_profile.ca_server_args({}) == []
    assert aws_profile.ca_server_args({"SHOPMESH_COMPOSE_PROFILES": "debug"}) == []
    on = {"SHOPMESH_COMPOSE_PROFILES": "debug, aws"}
    assert aws_profile.ca_server_args(on) == ["--ca", "acm-pca", "--pca-create", "--pca-mode", "upstream"]
    assert aws_profile.ca_server_args({**on, "SHOPMESH_PCA_MODE": "direct"})[-1] == "direct"
    with pytest.raises(aws_profile.AwsProfileError, match="SHOPMESH_PCA_MODE='sideways'"):
        aws_profile.ca_server_args({**on, "SHOPMESH_PCA_MODE": "sideways"})


def test_moto_refuses_to_start_when_the_profile_was_not_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOPMESH_COMPOSE_PROFILES", raising=False)
    with pytest.raises(aws_profile.AwsProfileError, match="COMPOSE_PROFILES=aws docker compose up"):
        aws_profile.require_active()
    monkeypatch.setenv("SHOPMESH_COMPOSE_PROFILES", "aws")
    aws_profile.require_active()


class _Ready(BaseHTTPRequestHandler):
    body = b"LIVE\n"

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.send_response(200 if self.body.startswith(b"LIVE") else 503)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def envoy_admin() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ready)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        _Ready.body = b"LIVE\n"


def test_sidecar_health_needs_envoy_live_and_a_fresh_ready_agent(tmp_path: Path, envoy_admin: str) -> None:
    status = tmp_path / "status.json"
    with pytest.raises(healthcheck.Unhealthy, match="no agent status"):
        healthcheck.check_sidecar(status, envoy_admin)
    status.write_text(json.dumps({"ready": True, "updated_at": time.time()}))
    healthcheck.check_sidecar(status, envoy_admin)

    status.write_text(json.dumps({"ready": True, "updated_at": time.time() - 60}))
    with pytest.raises(healthcheck.Unhealthy, match="old: its writer is gone"):
        healthcheck.check_sidecar(status, envoy_admin)
    status.write_text(json.dumps({"ready": False, "updated_at": time.time(), "last_error": "CA down"}))
    with pytest.raises(healthcheck.Unhealthy, match="CA down"):
        healthcheck.check_sidecar(status, envoy_admin)

    status.write_text(json.dumps({"ready": True, "updated_at": time.time()}))
    _Ready.body = b"PRE_INITIALIZING\n"
    with pytest.raises(healthcheck.Unhealthy, match="PRE_INITIALIZING"):
        healthcheck.check_sidecar(status, envoy_admin)


def test_app_health_check_names_the_address() -> None:
    with pytest.raises(healthcheck.Unhealthy, match="127.0.0.1:1"):
        healthcheck.check_app("127.0.0.1:1")
