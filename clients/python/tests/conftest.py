"""Fixtures: a real `sparsync serve` on a free loopback port, and clients closed after each test.

The binaries come from `SPARSYNC_BIN` and `SPARSYNC_CLIENT_BIN` when set, else from the cargo
target directory (`CARGO_TARGET_DIR`, default `<repo>/target`), `debug/` first, then
`release/`. A missing binary fails the test (it is never skipped): build them with
`cargo build --workspace`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pytest

from sparsync import Client

REPO = Path(__file__).resolve().parents[3]

#: The built-in mlp layout (src/protocol/model.rs).
MLP_LAYOUT = [
    ("fc1.weight", (784, 128)),
    ("fc1.bias", (128,)),
    ("fc2.weight", (128, 10)),
    ("fc2.bias", (10,)),
]
MLP_PARAMS = 784 * 128 + 128 + 128 * 10 + 10  # 101,770


def target_dir() -> Path:
    t = os.environ.get("CARGO_TARGET_DIR")
    if t:
        p = Path(t)
        return p if p.is_absolute() else REPO / p
    return REPO / "target"


def find_binary(env: str, name: str) -> Path:
    """The binary named by `env`, else `<target>/debug/NAME`, else `<target>/release/NAME`."""
    given = os.environ.get(env)
    if given:
        p = Path(given)
        if not p.is_file():
            pytest.fail(f"{env}={given}: no such file")
        return p
    candidates = [target_dir() / profile / name for profile in ("debug", "release")]
    for p in candidates:
        if p.is_file():
            return p
    pytest.fail(
        f"{name} not found (looked for {', '.join(map(str, candidates))}): build it with "
        f"`cargo build --workspace`, or set {env}"
    )
    raise AssertionError("unreachable")


def http_json(url: str, timeout: float = 10.0) -> Any:
    """GET `url` and parse its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


def fnv1a64(values: np.ndarray) -> str:
    """FNV-1a 64 of the little-endian f32 bytes of `values`, as 16 hex digits (as the server)."""
    h = 0xCBF29CE484222325
    for b in np.ascontiguousarray(values, dtype="<f4").tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Server:
    """A running `sparsync serve`: its addresses and JSON endpoints."""

    def __init__(self, proc: subprocess.Popen, http: str, log: Path):
        self.proc = proc
        self.http = http
        self.ws = re.sub(r"^http", "ws", http) + "/ws"
        self.log = log

    def get(self, path: str) -> Any:
        return http_json(self.http + path)

    def replica(self) -> Dict[str, Any]:
        """`/api/replica`: version, params and checksum of x̂ (answered live)."""
        return self.get("/api/replica")

    def status(self) -> Dict[str, Any]:
        """`/api/status` (republished at most every 100 ms)."""
        return self.get("/api/status")

    def record(self) -> List[Dict[str, Any]]:
        """Every event of `/api/record`, following its pages."""
        events: List[Dict[str, Any]] = []
        since = 0
        while True:
            page = self.get(f"/api/record?since={since}")
            events.extend(page["events"])
            if page["next"] >= page["end"] or page["next"] == since:
                return events
            since = page["next"]

    def catch_up(self, c: Client, timeout: float = 30.0) -> Dict[str, Any]:
        """Lets `c` apply what arrives until it holds the server's replica version (with no
        push in flight the server's x̂ then stays put); returns `/api/replica` at that moment."""
        deadline = time.monotonic() + timeout
        while True:
            c.sync(0.05)
            r = self.replica()
            if r["version"] == c.version:
                return r
            if time.monotonic() > deadline:
                pytest.fail(f"client at version {c.version}, server at {r['version']} after {timeout} s")

    def assert_same_replica(self, c: Client) -> Dict[str, Any]:
        r = self.catch_up(c)
        assert c.version == r["version"]
        assert c.checksum() == r["checksum"], f"replica differs from the server's at version {r['version']}"
        return r

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def sparsync_bin() -> Path:
    return find_binary("SPARSYNC_BIN", "sparsync")


@pytest.fixture(scope="session")
def native_client_bin() -> Path:
    return find_binary("SPARSYNC_CLIENT_BIN", "sparsync-client")


@pytest.fixture
def start_server(sparsync_bin: Path, tmp_path: Path):
    """A factory: `start_server(policy="asp", model="mlp", engine="cpu", listen="127.0.0.1:0",
    **settings)` starts
    `sparsync serve` with each setting as its flag (`max_pending_bytes=4096` →
    `--max-pending-bytes 4096`; True → the bare flag, False → `--flag false`, None → left
    out) and returns a :class:`Server`. Every server started is stopped after the test."""
    servers: List[Server] = []

    def start(
        policy: str = "asp", model: str = "mlp", engine: str = "cpu", listen: str = "127.0.0.1:0", **settings: Any
    ) -> Server:
        n = len(servers)
        ready = tmp_path / f"server-{n}.ready"
        log = tmp_path / f"server-{n}.log"
        args = [str(sparsync_bin), "serve", "--listen", listen, "--ready-file", str(ready)]
        for name, value in {"policy": policy, "model": model, "engine": engine, **settings}.items():
            if value is None:
                continue
            args.append("--" + name.replace("_", "-"))
            if value is False:
                args.append("false")
            elif value is not True:
                args.append(str(value))
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(args)}` exited with {proc.returncode}:\n{log_tail(log)}")
            text = ready.read_text().strip() if ready.exists() else ""
            m = re.fullmatch(r"https?://[^\s/]+:\d+", text)
            if m:
                # The file is written in place: only trust an address that answers.
                try:
                    http_json(text + "/api/status", timeout=2)
                    break
                except (OSError, ValueError, urllib.error.URLError):
                    pass
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"`{' '.join(args)}` was not ready after 60 s:\n{log_tail(log)}")
            time.sleep(0.05)
        server = Server(proc, text, log)
        servers.append(server)
        return server

    yield start
    for s in reversed(servers):
        s.stop()


@pytest.fixture
def server(start_server) -> Server:
    """A server with the defaults: policy asp, model mlp, CPU engine."""
    return start_server()


@pytest.fixture
def clients(start_server) -> Callable[..., Client]:
    """`clients(url, client_id, **kw)` connects a :class:`sparsync.Client`; each is closed after
    the test, before the servers stop."""
    made: List[Client] = []

    def connect(url: str, client_id: str, **kw: Any) -> Client:
        c = Client(url, client_id, **kw)
        made.append(c)
        return c

    yield connect
    for c in made:
        try:
            c.close("test over")
        except Exception:
            pass


def wait_event(c: Client, kind: str, timeout: float, pred: Optional[Callable[[dict], bool]] = None) -> dict:
    """Handles `c`'s events until one of type `kind` (matching `pred`) arrives."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {kind} event within {timeout} s; saw {[e['type'] for e in seen]}")
        ev = c.next_event(min(left, 1.0))
        if ev is None:
            continue
        if ev["type"] == kind and (pred is None or pred(ev)):
            return ev
        seen.append(ev)


@pytest.fixture
def wait_for_event():
    """`wait_for_event(client, "snapshot", timeout, pred=None)` → the event dict."""
    return wait_event
