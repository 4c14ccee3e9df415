"""Configuration from the environment, validated at start-up.

Every app reads its settings through these helpers so that a missing or bad
value stops the process at once with a message naming the variable and the
value, instead of failing later somewhere less obvious. `__main__` modules
print a ConfigError and exit with status 2.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# The runner starts every app with these (the process contract).
LISTEN_ENV = "SHOPMESH_APP_LISTEN"
DATA_DIR_ENV = "SHOPMESH_DATA_DIR"
APP_HOST = "127.0.0.1"
DEFAULT_LISTEN = f"{APP_HOST}:50051"


class ConfigError(Exception):
    """A configuration value is missing or unusable; the message names it."""


def parse_address(value: str, *, what: str, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port") into (host, port).

    `what` names the setting in error messages (an env variable, a flag).
    Port 0 ("pick a free port") only makes sense for a server started by a
    test, so callers opt in to it.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text:
        raise ConfigError(f"{what}={value!r} is not an address of the form HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{what}={value!r}: port {port_text!r} is not a number")
    port = int(port_text)
    lowest = 0 if allow_port_zero else 1
    if not lowest <= port <= 65535:
        raise ConfigError(f"{what}={value!r}: port {port} is outside {lowest}..65535")
    return host, port


def require_loopback(host: str, *, what: str, value: str) -> None:
    """Refuse a host that is not a loopback IP literal.

    Apps bind and dial plaintext only inside their pod; a non-loopback
    address would put unencrypted traffic on the pod network, which the mesh
    exists to prevent.
    """
    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(f"{what}={value!r}: host {host!r} is not an IP address") from None
    if not is_loopback:
        raise ConfigError(
            f"{what}={value!r}: host {host!r} is not a loopback address; "
            "plaintext traffic must stay inside the pod"
        )


def parse_listen_address(listen: str, *, what: str = "listen address") -> tuple[str, int]:
    """Validate an app's listen address: 127.0.0.1 only (port 0 allowed for tests).

    An app is reachable from outside its pod only through its sidecar's mTLS
    listener; binding anything but loopback would open a plaintext door.
    """
    host, port = parse_address(listen, what=what, allow_port_zero=True)
    if host != APP_HOST:
        raise ConfigError(
            f"{what}={listen!r}: apps bind {APP_HOST} only (the sidecar is the pod's only way in), not {host!r}"
        )
    return host, port


def env_str(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    """The value of `name`, or `default`; a missing value without a default is an error."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or value.strip() == "":
        if default is None:
            raise ConfigError(f"{name} is not set")
        return default
    return value.strip()


def env_address(
    name: str,
    default: str | None = None,
    *,
    loopback_only: bool = True,
    environ: Mapping[str, str] | None = None,
) -> tuple[str, int]:
    """A "host:port" variable as (host, port); loopback only unless told otherwise."""
    value = env_str(name, default, environ=environ)
    host, port = parse_address(value, what=name)
    if loopback_only:
        require_loopback(host, what=name, value=value)
    return host, port


def env_path(name: str, default: str | None = None, *, environ: Mapping[str, str] | None = None) -> Path:
    """A filesystem path variable, made absolute (the runner may change directory later)."""
    value = env_str(name, default, environ=environ)
    if "\x00" in value:
        raise ConfigError(f"{name}={value!r} contains a NUL byte")
    return Path(value).expanduser().absolute()


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address: brackets IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ensure_private_dir(path: Path, *, what: str = DATA_DIR_ENV) -> Path:
    """Create `path` (and parents) if missing and make it 0700.

    The directory holds this app's databases and keys; nobody else on the
    machine has a reason to read it.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing
        # directory; chmod says what we mean either way.
        path.chmod(0o700)
    except OSError as exc:
        raise ConfigError(f"{what}={str(path)!r}: cannot create a private directory: {exc.strerror}") from exc
    if not path.is_dir():
        raise ConfigError(f"{what}={str(path)!r} is not a directory")
    return path


def load_or_create_secret(path: Path, size: int) -> bytes:
    """Read a random secret of `size` bytes from `path`, creating it on first use.

    Creation is atomic and never clobbers: the bytes go to a temporary file
    opened with O_CREAT|O_EXCL and mode 0600, are fsynced, and are published
    with link(), which fails if another process got there first (then we use
    theirs). A reader therefore never sees a half-written key. An existing
    file readable by group or others is refused rather than silently used.
    """
    ensure_private_dir(path.parent, what=str(path.parent))
    try:
        return _read_secret(path, size)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(os.urandom(size))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_secret(path, size)


def _read_secret(path: Path, size: int) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigError(f"secret file {str(path)!r} has mode {mode:04o}; it must be 0600 (chmod 600 it)")
    data = path.read_bytes()
    if len(data) != size:
        raise ConfigError(f"secret file {str(path)!r} holds {len(data)} bytes, expected {size}")
    return data


@dataclass(frozen=True)
class AppConfig:
    """What every app reads from the process contract."""

    listen: str  # "127.0.0.1:<port>"
    data_dir: Path  # exists, mode 0700


def app_config_from_env(environ: Mapping[str, str] | None = None) -> AppConfig:
    """$SHOPMESH_APP_LISTEN (default 127.0.0.1:50051) and $SHOPMESH_DATA_DIR (required, created 0700)."""
    listen = env_str(LISTEN_ENV, DEFAULT_LISTEN, environ=environ)
    _host, port = parse_listen_address(listen, what=LISTEN_ENV)
    if port == 0:
        # The runner and the sidecar must know the port in advance.
        raise ConfigError(f"{LISTEN_ENV}={listen!r}: port 0 is for tests; give a fixed port")
    data_dir = ensure_private_dir(env_path(DATA_DIR_ENV, environ=environ), what=DATA_DIR_ENV)
    return AppConfig(listen=listen, data_dir=data_dir)
