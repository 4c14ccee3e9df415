"""Flag parsing shared by the CA server and the agent: every value is checked at start-up.

argparse turns an ArgumentTypeError into "error: argument --flag: message"
and exit status 2, so a bad value stops the process naming the flag.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from datetime import timedelta

from pki.durations import parse_duration
from pki.errors import PkiError
from pki.spiffe_ids import check_workload_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_LEVELS = ("debug", "info", "warning", "error")


def host_port(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') with a port 1..65535."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host or not port_s.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not HOST:PORT (e.g. 127.0.0.1:8440)")
    port = int(port_s)
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"'{text}': port {port} is outside 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"'{text}': {err}") from err
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"'{text}': write an IPv6 host in brackets, e.g. [::1]:{port}")
    return host, port


def loopback_host_port(text: str) -> tuple[str, int]:
    """HOST:PORT on a loopback address (Envoy admin, app health): they must never be reachable from outside."""
    host, port = host_port(text)
    try:
        is_loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        is_loopback = host == "localhost"
    if not is_loopback:
        raise argparse.ArgumentTypeError(f"'{text}' is not a loopback address (use 127.0.0.1:PORT)")
    return host, port


def duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except PkiError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def spiffe_id(text: str) -> str:
    try:
        check_workload_id(text)
    except PkiError as err:
        raise argparse.ArgumentTypeError(str(err)) from err
    return text


def format_host_port(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def setup_logging(level: str) -> None:
    """Plain logging to stderr, one line per event (the runner redirects stderr to a file)."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT)
