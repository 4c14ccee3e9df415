"""Payments through the real mesh: orders paid with cards wrapped by AWS KMS (moto), and
no card number anywhere a mesh writes (rows 30, 36, 37).

Two meshes: the default one (local wrapping key), and one started with
`shopmesh up --kms aws --kms-create` against moto listening on 0.0.0.0, so
the payments app reaches it from its pod namespace through the bridge (the
runner rewrites the loopback AWS endpoint for pod processes).

The leak scan places orders with known test cards of several brands through
`shopmesh demo --card`, provokes error paths with card numbers in the
request, waits until the orders' spans are on disk, and then searches every
file under the state directory (logs, databases, WAL files, traces, keys,
the audit log) for each number, with and without separators, in ASCII and
UTF-16.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import grpc
import pytest

from services.payments.admin import PAYMENTS_DATA_DIR
from services.payments.audit import AUDIT_PATH, read_entries
from services.payments.storage import DB_NAME
from shopmesh import topology
from shopmesh.awsstub import MotoServer, moto_server
from shopmesh.orders.v1 import orders_pb2, orders_pb2_grpc
from shopmesh.payments.v1 import payments_pb2, payments_pb2_grpc

pytestmark = pytest.mark.mesh

KMS_MESH = {"up_args": ["--kms", "aws", "--kms-create"]}
# Test cards of every brand payments knows, as a customer might type them.
CARDS = {
    "4242 4242 4242 4242": ("visa", "4242"),
    "5555-5555-5555-4444": ("mastercard", "4444"),
    "2223 0031 2200 3222": ("mastercard", "3222"),
    "3782 822463 10005": ("amex", "0005"),
    "6011 1111 1111 1117": ("discover", "1117"),
}
# Sent in requests that must fail; they must not be echoed or stored either:
# numbers that fail the Luhn check, and a valid number sent where a token goes.
LUHN_INVALID = ["4242424242424241", "378282246310006"]
MISPLACED = "5105105105105100"
REFUSED = [*LUHN_INVALID, MISPLACED]


def digits(number: str) -> str:
    return "".join(ch for ch in number if ch.isdigit())


def spellings(number: str) -> list[bytes]:
    plain = digits(number)
    fours = [plain[i : i + 4] for i in range(0, len(plain), 4)]
    amex = [plain[:4], plain[4:10], plain[10:]]
    texts = {plain, " ".join(fours), "-".join(fours), " ".join(amex), "-".join(amex)}
    return [t.encode(enc) for t in texts for enc in ("ascii", "utf-16-le")]


def find_card_numbers(root: Path, numbers: list[str]) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        content = path.read_bytes()
        for number in numbers:
            for spelling in spellings(number):
                if spelling in content:
                    hits.append(f"{spelling!r} in {path}")
    return hits


def place_orders(mesh, cards: dict[str, tuple[str, str]]) -> list[dict]:  # type: ignore[no-untyped-def]
    results = []
    for number, (brand, last4) in cards.items():
        out = mesh.cli("demo", "--json", "--card", number)
        assert digits(number) not in out.stdout + out.stderr and number not in out.stdout + out.stderr
        result = json.loads(out.stdout)
        assert result["state"] == "paid", result
        assert result["card"] == f"{brand} •••• {last4}"
        results.append(result)
    return results


def provoke_errors(mesh) -> None:  # type: ignore[no-untyped-def]
    """Card numbers where they do not belong: refused, never echoed."""
    with grpc.insecure_channel(mesh.ingress) as chan:
        payments = payments_pb2_grpc.PaymentsStub(chan)
        orders = orders_pb2_grpc.OrdersStub(chan)
        for number in LUHN_INVALID:
            with pytest.raises(grpc.RpcError) as info:
                payments.Tokenize(
                    payments_pb2.TokenizeRequest(card_number=number, exp_month=12, exp_year=2031, cvv="123"), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert number not in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            orders.PlaceOrder(
                orders_pb2.PlaceOrderRequest(
                    items=[orders_pb2.LineItem(product_id="sku-0001", quantity=1)],
                    payment_token=MISPLACED,
                    idempotency_key="leak-probe",
                ),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert MISPLACED not in (info.value.details() or "")
        # The ingress may not call Charge: denied at the sidecar, the number goes nowhere.
        with pytest.raises(grpc.RpcError) as info:
            payments.Charge(
                payments_pb2.ChargeRequest(token=MISPLACED, amount_minor=1, currency="EUR", idempotency_key="x"),
                timeout=10,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert MISPLACED not in (info.value.details() or "")


def wait_for_spans(state_dir: Path, trace_ids: list[str], timeout_s: float = 30) -> None:
    """Spans are exported in batches: wait until every order's trace has payments spans on disk."""
    traces = state_dir / "traces"
    if not traces.exists():
        return
    deadline = time.monotonic() + timeout_s
    while True:
        blob = b"".join(p.read_bytes() for p in traces.rglob("*") if p.is_file())
        missing = [t for t in trace_ids if t.encode() not in blob and bytes.fromhex(t) not in blob]
        if not missing:
            return
        assert time.monotonic() < deadline, f"traces {missing} not on disk under {traces} after {timeout_s:.0f}s"
        time.sleep(0.5)


def assert_no_card_numbers_anywhere(state_dir: Path, numbers: list[str]) -> None:
    hits = find_card_numbers(state_dir, numbers)
    assert not hits, "card numbers found:\n" + "\n".join(hits)


def test_no_card_number_anywhere_under_the_default_mesh(mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rows 30, 36 on the default mesh (local wrapping key)."""
    # The scan can find what it looks for (a scan that cannot fail proves nothing).
    (tmp_path / "note.txt").write_text("card 3782-822463-10005 in a note")
    (tmp_path / "wide.bin").write_bytes("6011111111111117".encode("utf-16-le"))
    assert len(find_card_numbers(tmp_path, ["378282246310005", "6011 1111 1111 1117"])) == 2

    results = place_orders(mesh, dict(list(CARDS.items())[:3]))
    provoke_errors(mesh)
    wait_for_spans(mesh.state_dir, [r["trace_id"] for r in results])
    assert_no_card_numbers_anywhere(mesh.state_dir, [*CARDS, *REFUSED])


# --- the AWS KMS mesh ------------------------------------------------------------------


@pytest.fixture(scope="session")
def pod_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto on every address: pods reach it through their bridge. Session-scoped,
    because the plugin keeps the KMS mesh running until another mesh is needed."""
    with moto_server("0.0.0.0", log_file=tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture
def aws_env(pod_moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    env = pod_moto.env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def payments_db(state_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{state_dir / PAYMENTS_DATA_DIR / DB_NAME}?mode=ro", uri=True)


@pytest.mark.parametrize("mesh", [KMS_MESH], indirect=True)
def test_orders_are_paid_with_cards_wrapped_by_kms(aws_env: dict[str, str], pod_moto: MotoServer, mesh) -> None:  # type: ignore[no-untyped-def]
    """The AWS KMS path through the mesh: real orders, moto as KMS, every row's record names the key."""
    provider = json.loads((mesh.state_dir / PAYMENTS_DATA_DIR / "keys" / "provider.json").read_text())
    assert provider["kms"] == "aws"
    arn = provider["key_id"]
    kms = boto3.client("kms", endpoint_url=pod_moto.endpoint.replace("0.0.0.0", "127.0.0.1"), region_name="us-east-1")
    assert kms.describe_key(KeyId=arn)["KeyMetadata"]["KeyState"] == "Enabled"
    # The payments app (in its pod namespace) was given moto's address on the bridge, not loopback.
    record = mesh.record
    environ = Path(f"/proc/{record.pods['payments'].app_pid}/environ").read_bytes().split(b"\0")
    assert f"AWS_ENDPOINT_URL=http://{record.network.host_ip}:{pod_moto.port}".encode() in environ

    results = place_orders(mesh, CARDS)
    # The same card again, spelled differently: the same token, no new record.
    results += place_orders(mesh, {"4242-4242-4242-4242": ("visa", "4242")})
    provoke_errors(mesh)

    with payments_db(mesh.state_dir) as conn:
        cards = conn.execute("SELECT key_provider, ciphertext FROM cards").fetchall()
    assert len(cards) == len(CARDS)
    for key_provider, ciphertext in cards:
        assert key_provider == f"aws-kms:{arn}"
        assert ciphertext[0] == 0x02 and arn.encode() in ciphertext

    entries = read_entries(mesh.state_dir / PAYMENTS_DATA_DIR / AUDIT_PATH)
    ingress, orders = topology.spiffe_id_for("ingress"), topology.spiffe_id_for("orders")
    assert {e["caller"] for e in entries if e["operation"] == "tokenize"} == {ingress}
    assert {e["caller"] for e in entries if e["operation"] in ("detokenize", "charge")} == {orders}
    generated = [e for e in entries if e["operation"] == "key.generate-data-key" and e["outcome"] == "ok"]
    assert generated and {e["details"]["key"] for e in generated} == {f"aws-kms:{arn}"}
    verified = mesh.cli("payments", "audit", "verify")
    assert "OK" in verified.stdout

    wait_for_spans(mesh.state_dir, [r["trace_id"] for r in results])
    assert_no_card_numbers_anywhere(mesh.state_dir, [*CARDS, *REFUSED])


@pytest.mark.parametrize("mesh", [KMS_MESH], indirect=True)
def test_rewrap_while_the_mesh_serves_orders(aws_env: dict[str, str], mesh) -> None:  # type: ignore[no-untyped-def]
    """Row 34 live: `shopmesh payments rewrap` re-encrypts every card while payments keeps running."""
    place_orders(mesh, {"4242 4242 4242 4242": ("visa", "4242")})
    with payments_db(mesh.state_dir) as conn:
        before = dict(conn.execute("SELECT token, ciphertext FROM cards").fetchall())
    proc = subprocess.run(
        [sys.executable, "-m", "shopmesh.cli", "payments", "rewrap", "--state-dir", str(mesh.state_dir)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **aws_env},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"done: {len(before)}/{len(before)} cards re-encrypted" in proc.stdout
    with payments_db(mesh.state_dir) as conn:
        after = dict(conn.execute("SELECT token, ciphertext FROM cards").fetchall())
    assert after.keys() == before.keys()
    assert all(after[token] != before[token] for token in before), "every record has a fresh data key"
    place_orders(mesh, {"4242 4242 4242 4242": ("visa", "4242"), "6011-1111-1111-1117": ("discover", "1117")})
