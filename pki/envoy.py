"""Envoy, as the agent runs it: start after the first SVID, restart on exit, stop on SIGTERM.

Envoy stays in the agent's process group, so whoever started the agent in
its own session (the runner) can reap both with one killpg, even after the
agent was killed outright. Its pid is recorded in the agent's data directory:
if the agent alone dies (SIGKILL, crash) Envoy keeps serving the last
certificate it got, the restarted agent adopts the running Envoy instead of
starting a second one, and Envoy reconnects to the new SDS socket by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pki.envoy")

PID_FILE = "envoy.pid"
STOP_DEADLINE_S = 5.0
RESTART_BACKOFF_MIN_S = 0.5
RESTART_BACKOFF_MAX_S = 15.0
# An Envoy that ran this long without exiting is considered healthy again:
# the next crash restarts it after the minimum back-off.
STABLE_RUN_S = 30.0
ADMIN_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class EnvoyOptions:
    binary: Path
    config: Path
    admin: tuple[str, int]
    log_file: Path

    def command(self) -> list[str]:
        return [
            str(self.binary), "-c", str(self.config),
            # Several Envoys share this machine (one per pod): no hot restart.
            "--disable-hot-restart",
            # Warnings and the access log; `info` adds hundreds of start-up lines.
            "--log-level", "warning",
            # Access log lines reach the file within half a second, not Envoy's
            # default ten: people and tests read them while traffic flows.
            "--file-flush-interval-msec", "500",
        ]


class EnvoySupervisor:
    """Owns (or adopts) one Envoy process."""

    def __init__(self, options: EnvoyOptions, data_dir: Path) -> None:
        self.options = options
        self._pid_file = data_dir / PID_FILE
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False

    def adopt_running(self) -> bool:
        """Adopt the Envoy a previous agent left running (same config), if any."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return False
        if _is_our_envoy(pid, self.options.config):
            self.pid = pid
            log.info("adopted running Envoy pid %d (left by a previous agent)", pid)
            return True
        self._pid_file.unlink(missing_ok=True)
        return False

    async def run(self) -> None:
        """Keep Envoy running until stop(); restart it with back-off whenever it exits."""
        backoff = RESTART_BACKOFF_MIN_S
        while not self._stopping:
            started = time.monotonic()
            if self.pid is None:
                await self._start()
            code = await self._wait_exit()
            if self._stopping:
                return
            ran = time.monotonic() - started
            if ran >= STABLE_RUN_S:
                backoff = RESTART_BACKOFF_MIN_S
            delay = backoff * random.uniform(0.8, 1.2)
            self.last_exit = f"pid {self.pid}: {code} after {ran:.1f}s"
            log.error(
                "Envoy pid %s exited (%s) after %.1fs; restarting in %.1fs (see %s)",
                self.pid,
                code,
                ran,
                delay,
                self.options.log_file,
            )
            self.pid = None
            self._pid_file.unlink(missing_ok=True)
            await asyncio.sleep(delay)  # back-off between restarts, not synchronisation
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            self.restarts += 1

    async def _start(self) -> None:
        log_fd = os.open(self.options.log_file, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.options.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
            )
        finally:
            os.close(log_fd)
        self.pid = self._proc.pid
        self._pid_file.write_text(f"{self.pid}\n")
        log.info("started Envoy pid %d: %s", self.pid, " ".join(self.options.command()))

    async def _wait_exit(self) -> str:
        if self._proc is not None and self._proc.pid == self.pid:
            rc = await self._proc.wait()
            self._proc = None
            return f"exit status {rc}" if rc >= 0 else f"signal {-rc}"
        # An adopted Envoy is not our child: we cannot wait() for it, so poll.
        assert self.pid is not None
        while _alive(self.pid):
            await asyncio.sleep(0.2)  # polling an adopted process's existence
        return "exit status unknown (adopted process)"

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_DEADLINE_S; forget the pid file."""
        self._stopping = True
        pid = self.pid
        if pid is None:
            return
        log.info("stopping Envoy pid %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_DEADLINE_S
        while _alive(pid) and time.monotonic() < deadline:
            if self._proc is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._proc.wait(), timeout=max(0.0, deadline - time.monotonic()))
            else:
                await asyncio.sleep(0.1)  # polling an adopted process's exit
        if _alive(pid):
            log.warning("Envoy pid %d ignored SIGTERM for %.0fs: SIGKILL", pid, STOP_DEADLINE_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if self._proc is not None:
                await self._proc.wait()
        self.pid = None
        self._pid_file.unlink(missing_ok=True)

    # Admin API: plain urllib with short timeouts, run in a thread by the caller.

    def admin_url(self, path: str) -> str:
        host, port = self.options.admin
        return f"http://{host}:{port}{path}"

    def is_live(self) -> bool:
        """True if admin /ready answers LIVE (Envoy initialised, listeners ready)."""
        try:
            with urllib.request.urlopen(self.admin_url("/ready"), timeout=ADMIN_TIMEOUT_S) as resp:
                return bool(resp.status == 200 and resp.read().strip() == b"LIVE")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def served_serial(self, spiffe_id: str) -> str | None:
        """The serial of the SVID Envoy really serves, from admin /certs; None if unknown.

        Every TLS context (inbound listener, outbound clusters) gets the
        "default" secret; while a push is propagating they can differ for a
        moment, and then we report the oldest one, the one that expires first.
        """
        try:
            with urllib.request.urlopen(self.admin_url("/certs"), timeout=ADMIN_TIMEOUT_S) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return served_serial_from_certs(doc, spiffe_id)


def served_serial_from_certs(doc: dict[str, Any], spiffe_id: str) -> str | None:
    """Pick our SVID's serial out of an Envoy /certs document (see EnvoySupervisor.served_serial)."""
    found: list[tuple[str, str]] = []
    for context in doc.get("certificates", []):
        for cert in context.get("cert_chain", []):
            uris = [san.get("uri") for san in cert.get("subject_alt_names", [])]
            if spiffe_id in uris and cert.get("serial_number"):
                found.append((str(cert.get("expiration_time", "")), str(cert["serial_number"]).lower()))
    if not found:
        return None
    return min(found)[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a running Envoy.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_our_envoy(pid: int, config: Path) -> bool:
    """Guard against pid reuse: the process must be running an Envoy with our config."""
    if not _alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(config).encode() in argv and any(b"envoy" in a for a in argv[:2])
