"""Start microserve processes on loopback ports and wait until they are ready (tests, benchmarks, serve)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedProcess:
    """A child process with its output in a log file (a pipe nobody reads would block it)."""

    def __init__(self, cmd: list[str], url: str, env: Mapping[str, str] | None = None) -> None:
        """`env` adds to this process's environment (a token travels there, not in argv)."""
        self.url = url
        self.ssl_context: ssl.SSLContext | None = None  # what /ready is polled with, for an HTTPS url
        self._log = tempfile.NamedTemporaryFile(prefix="microserve-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def log_path(self) -> Path:
        return Path(self._log.name)

    def output(self, last: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-last:]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll /ready until 200, failing early (with the process's output) if it died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"process exited with {self.proc.returncode} before becoming ready:\n{self.output()}"
                )
            ready = f"{self.url}/ready"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(ready, timeout=1.0, context=self.ssl_context) as r,
            ):
                if r.status == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url} not ready after {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: the process dies at once, mid-request if it was in one."""
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful: requests in flight drain), then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        with contextlib.suppress(OSError):
            self.log_path.unlink()


def _launch_engine(
    args: tuple[str, ...], threads: int, env: Mapping[str, str] | None = None
) -> ManagedProcess:
    """A `microserve engine` starting on a free loopback port (not waited for)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "microserve",
        "engine",
        "--port",
        str(port),
        "--threads",
        str(threads),
        *args,
    ]
    return ManagedProcess(cmd, f"http://127.0.0.1:{port}", env)


def start_engine(
    *args: str, threads: int = 1, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> ManagedProcess:
    """Start a `microserve engine` on a free loopback port and wait until it is ready."""
    engine = _launch_engine(args, threads, env)
    try:
        engine.wait_ready(timeout=timeout)
    except BaseException:
        engine.stop()
        raise
    return engine


@contextlib.contextmanager
def engine_process(*args: str, threads: int = 1, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A `microserve engine` on a free loopback port; yields its base URL and stops it afterwards."""
    engine = start_engine(*args, threads=threads, env=env)
    try:
        yield engine.url
    finally:
        engine.stop()


@contextlib.contextmanager
def engine_fleet(
    count: int,
    *args: str,
    threads: int = 1,
    timeout: float = 300.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[list[str]]:
    """`count` engines started side by side (one after another takes `count` times as long); yields their
    URLs once all are ready and stops them afterwards."""
    engines: list[ManagedProcess] = []
    try:
        for _ in range(count):
            engines.append(_launch_engine(args, threads, env))
        for engine in engines:
            engine.wait_ready(timeout=timeout)
        yield [e.url for e in engines]
    finally:
        for engine in engines:
            engine.stop()
