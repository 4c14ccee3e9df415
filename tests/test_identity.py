"""The caller's SPIFFE ID from x-forwarded-client-cert (shopmesh/identity.py)."""

from __future__ import annotations

import pytest

from shopmesh.identity import XfccError, caller_spiffe_id, describe_caller, parse_xfcc

ORDERS = "spiffe://shopmesh.internal/ns/shop/sa/orders"
INGRESS = "spiffe://shopmesh.internal/ns/shop/sa/ingress"
PAYMENTS = "spiffe://shopmesh.internal/ns/shop/sa/payments"
HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"


def xfcc(value: str | bytes, key: str = "x-forwarded-client-cert") -> list[tuple[str, str | bytes]]:
    return [("user-agent", "grpc-python"), (key, value)]


def test_envoy_element_yields_the_uri() -> None:
    assert caller_spiffe_id(xfcc(f"By={PAYMENTS};Hash={HASH};URI={ORDERS}")) == ORDERS


def test_the_last_element_is_the_one_our_sidecar_appended() -> None:
    value = f"By={ORDERS};Hash=aa;URI={INGRESS},By={PAYMENTS};Hash={HASH};URI={ORDERS}"
    assert caller_spiffe_id(xfcc(value)) == ORDERS
    # ... even when an earlier element names someone more privileged.
    assert caller_spiffe_id(xfcc(f"URI={ORDERS}, By={PAYMENTS};URI={INGRESS}")) == INGRESS


def test_quoted_values_may_hold_separators_and_escaped_quotes() -> None:
    subject = 'CN=orders,O=Shop;OU=\\"mesh\\"'
    value = f'By={PAYMENTS};Hash={HASH};Subject="{subject}";URI={ORDERS}'
    assert parse_xfcc(value) == [
        [("by", PAYMENTS), ("hash", HASH), ("subject", 'CN=orders,O=Shop;OU="mesh"'), ("uri", ORDERS)]
    ]
    assert caller_spiffe_id(xfcc(value)) == ORDERS
    assert caller_spiffe_id(xfcc(f'By={PAYMENTS};URI="{ORDERS}"')) == ORDERS


def test_a_quoted_comma_does_not_split_elements() -> None:
    value = f'By={PAYMENTS};Subject="O=a,URI={INGRESS}";URI={ORDERS}'
    elements = parse_xfcc(value)
    assert len(elements) == 1
    assert caller_spiffe_id(xfcc(value)) == ORDERS


def test_keys_are_case_insensitive_and_header_names_too() -> None:
    assert caller_spiffe_id(xfcc(f"by={PAYMENTS};uri={ORDERS}")) == ORDERS
    assert caller_spiffe_id(xfcc(f"By={PAYMENTS};URI={ORDERS}", key="X-Forwarded-Client-Cert")) == ORDERS


def test_bytes_values_and_repeated_headers() -> None:
    assert caller_spiffe_id(xfcc(f"By={PAYMENTS};URI={ORDERS}".encode())) == ORDERS
    repeated = [("x-forwarded-client-cert", f"URI={INGRESS}"), ("x-forwarded-client-cert", f"URI={ORDERS}")]
    assert caller_spiffe_id(repeated) == ORDERS


@pytest.mark.parametrize(
    "value",
    [
        f"URI={ORDERS},By={PAYMENTS};Hash={HASH}",  # last element has no URI
        f"By={PAYMENTS};URI={ORDERS};URI={INGRESS}",  # two URIs: not an X509-SVID
        f"By={PAYMENTS};URI=https://shopmesh.internal/ns/shop/sa/orders",
        f"By={PAYMENTS};URI=spiffe://ShopMesh.internal/ns/shop/sa/orders",  # not canonical
        f"By={PAYMENTS};URI=spiffe://shopmesh.internal",  # no path: a trust domain, not a workload
        f"By={PAYMENTS};URI=spiffe://shopmesh.internal/ns/../sa/orders",
        f'By={PAYMENTS};URI="{ORDERS}',  # unterminated quote
        f'By={PAYMENTS};URI="{ORDERS}"x',  # text after the closing quote
        f"By={PAYMENTS};{ORDERS}",  # a pair without '='
        f"By={PAYMENTS};URI=",
        "",
        ",,,",
    ],
)
def test_anything_doubtful_is_anonymous(value: str) -> None:
    assert caller_spiffe_id(xfcc(value)) is None


def test_no_header_means_anonymous() -> None:
    assert caller_spiffe_id(None) is None
    assert caller_spiffe_id([]) is None
    assert caller_spiffe_id([("x-client-cert", f"URI={ORDERS}")]) is None
    assert describe_caller(None) == "anonymous"
    assert describe_caller(xfcc(f"URI={ORDERS}")) == ORDERS


@pytest.mark.parametrize(
    ("value", "message_part"),
    [
        ('URI="abc', "unterminated quoted value"),
        ("URI=a;junk", "'junk' has no '='"),
        ("=x", "empty key"),
        ('URI="a"b', "text after a closing quote"),
    ],
)
def test_parse_errors_name_the_problem(value: str, message_part: str) -> None:
    with pytest.raises(XfccError) as info:
        parse_xfcc(value)
    assert message_part in str(info.value)


def test_whitespace_around_elements_is_ignored() -> None:
    assert parse_xfcc(f" By={PAYMENTS} ; URI={ORDERS} , URI={INGRESS} ") == [
        [("by", PAYMENTS), ("uri", ORDERS)],
        [("uri", INGRESS)],
    ]
