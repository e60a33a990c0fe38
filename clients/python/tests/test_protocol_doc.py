"""docs/protocol.md, checked against the server by a client written from the document alone.

Everything below the fixtures is a minimal sparsync client in plain Python (numpy, struct and
the `websockets` package's sync client), built only from what docs/protocol.md says: the hello
and welcome, the binary frame layouts, the replica rule and its FNV-1a 64 checksum, acks,
rejects, errors and close codes. It does not import the `sparsync` package and uses none of
conftest.py's fixtures, so the file also runs on its own:

    SPARSYNC_BIN=target/debug/sparsync python -m pytest --noconftest test_protocol_doc.py

When a test here fails, either the server or the document is wrong: fix one so that they agree.
The server binary comes from `SPARSYNC_BIN`, else `<CARGO_TARGET_DIR or <repo>/target>/debug/
sparsync`; a missing binary fails the tests (it is never skipped).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

REPO = Path(__file__).resolve().parents[3]
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
TIMEOUT = 30.0  # seconds for anything the server should answer (the machine may be busy)

# --- docs/protocol.md, "Models" ------------------------------------------------------------

LAYOUTS = {
    "logreg": [("fc.weight", [784, 10]), ("fc.bias", [10])],
    "mlp": [
        ("fc1.weight", [784, 128]),
        ("fc1.bias", [128]),
        ("fc2.weight", [128, 10]),
        ("fc2.bias", [10]),
    ],
    "cnn": [
        ("conv1.weight", [8, 1, 5, 5]),
        ("conv1.bias", [8]),
        ("conv2.weight", [16, 8, 5, 5]),
        ("conv2.bias", [16]),
        ("fc.weight", [256, 10]),
        ("fc.bias", [10]),
    ],
}


def param_count(layout) -> int:
    return sum(math.prod(shape) for _, shape in layout)


MLP_PARAMS = param_count(LAYOUTS["mlp"])
M64 = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed: int) -> None:
        self.state = seed & M64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)


def initial_model(layout, seed: int) -> np.ndarray:
    """The documented initialisation: one SplitMix64 stream over the tensors in layout order."""
    rng = SplitMix64(seed)
    parts = []
    for _, shape in layout:
        n = math.prod(shape)
        if len(shape) == 1:
            parts.append(np.zeros(n, dtype=np.float32))
            continue
        if len(shape) == 2:  # linear, [in, out]
            fi, fo = shape
        else:  # convolution, [out, in, kh, kw]
            k = math.prod(shape[2:])
            fi, fo = shape[1] * k, shape[0] * k
        # "(2u − 1) · limit in binary32 arithmetic, with limit = sqrt(6 / (fi + fo))"
        limit = np.sqrt(np.float32(6.0) / np.float32(fi + fo), dtype=np.float32)
        u = np.array([rng.next() >> 40 for _ in range(n)], dtype=np.float32) / np.float32(
            1 << 24
        )
        parts.append(((np.float32(2.0) * u - np.float32(1.0)) * limit).astype(np.float32))
    return np.concatenate(parts)


# --- docs/protocol.md, "The replica: applying Deltas exactly" ----------------------------

TINY = np.float32(2.0**-126)


def canon(v: np.ndarray) -> np.ndarray:
    """+0.0 where |v| < 2^-126 (a subnormal or either zero), v elsewhere."""
    return np.where(np.abs(v) < TINY, np.float32(0.0), v).astype(np.float32)


def apply_entries(x: np.ndarray, idx: np.ndarray, h: np.ndarray) -> None:
    """x̂[i] = canon(x̂[i] + f32(h)) in binary32, round to nearest even."""
    x[idx] = canon(x[idx] + h.astype(np.float32))


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return f"{h:016x}"


def checksum(x: np.ndarray) -> str:
    return fnv1a64(x.astype("<f4").tobytes())


# --- docs/protocol.md, "Binary frames" ----------------------------------------------------

MAGIC = b"SPSY"
PUSH, DELTA, SNAPSHOT = 1, 2, 3
PREFIX = struct.Struct("<4sHBB")  # magic, protocol version, kind, flags: 8 bytes
PUSH_HEADER = struct.Struct("<4sHBBQQIIfI")  # 40 bytes
DELTA_HEADER = struct.Struct("<4sHBBQQII")  # 32 bytes
SNAPSHOT_HEADER = struct.Struct("<4sHBBQIB3s")  # 24 bytes
assert (PREFIX.size, PUSH_HEADER.size, DELTA_HEADER.size, SNAPSHOT_HEADER.size) == (8, 40, 32, 24)


def sparse_payload(idx, vals) -> bytes:
    idx = np.asarray(idx, dtype="<u4")
    vals = np.asarray(vals, dtype="<f2")
    assert idx.shape == vals.shape
    pad = b"\0\0" if len(idx) % 2 else b""
    return idx.tobytes() + vals.tobytes() + pad


def push_frame(
    base_version: int,
    seq: int,
    idx,
    vals,
    samples: int = 32,
    local_steps: int = 10,
    loss: float = 0.5,
    nnz: Optional[int] = None,
    magic: bytes = MAGIC,
    version: int = 1,
    kind: int = PUSH,
    flags: int = 0,
) -> bytes:
    n = len(idx) if nnz is None else nnz
    head = PUSH_HEADER.pack(
        magic, version, kind, flags, base_version, seq, samples, local_steps, loss, n
    )
    return head + sparse_payload(idx, vals)


def parse_sparse(frame: bytes, offset: int, nnz: int, params: int) -> Tuple[np.ndarray, np.ndarray]:
    end = offset + 6 * nnz
    pad = 2 if nnz % 2 else 0
    assert len(frame) == end + pad, f"sparse frame of {len(frame)} bytes, nnz {nnz}"
    assert frame[end:] == b"\0" * pad, "padding must be zero"
    idx = np.frombuffer(frame, dtype="<u4", count=nnz, offset=offset).astype(np.int64)
    h = np.frombuffer(frame, dtype="<f2", count=nnz, offset=offset + 4 * nnz).copy()
    assert np.all(np.diff(idx) > 0), "indices must be strictly ascending"
    assert nnz == 0 or idx[-1] < params, "indices must be below the parameter count"
    assert np.all(np.isfinite(h)), "values must be finite"
    return idx, h


def parse_server_frame(frame: bytes, params: int) -> Dict[str, Any]:
    assert len(frame) % 4 == 0, f"a frame of {len(frame)} bytes is not a multiple of 4"
    magic, version, kind, flags = PREFIX.unpack_from(frame)
    assert magic == MAGIC and version == 1 and flags == 0, (magic, version, flags)
    if kind == DELTA:
        _, _, _, _, ver, base, nnz, reserved = DELTA_HEADER.unpack_from(frame)
        assert reserved == 0
        idx, h = parse_sparse(frame, DELTA_HEADER.size, nnz, params)
        return {"kind": "delta", "version": ver, "base_version": base, "idx": idx, "h": h}
    if kind == SNAPSHOT:
        _, _, _, _, ver, n, dtype, reserved = SNAPSHOT_HEADER.unpack_from(frame)
        assert dtype == 0 and reserved == b"\0\0\0", (dtype, reserved)
        assert len(frame) == SNAPSHOT_HEADER.size + 4 * n
        values = np.frombuffer(frame, dtype="<f4", count=n, offset=SNAPSHOT_HEADER.size)
        return {"kind": "snapshot", "version": ver, "n": n, "values": values.astype(np.float32)}
    raise AssertionError(f"the server sent a binary frame of kind {kind}")


# --- the server ---------------------------------------------------------------------------


def server_binary() -> Path:
    given = os.environ.get("SPARSYNC_BIN")
    if given:
        p = Path(given)
    else:
        t = os.environ.get("CARGO_TARGET_DIR")
        target = (Path(t) if Path(t).is_absolute() else REPO / t) if t else REPO / "target"
        p = target / "debug" / "sparsync"
    if not p.is_file():
        pytest.fail(f"sparsync server binary not found at {p}: build it (cargo build) or set SPARSYNC_BIN")
    return p


class Server:
    def __init__(self, args: List[str], workdir: Path) -> None:
        ready = workdir / "ready"
        self.log_path = workdir / "server.log"
        self.log = open(self.log_path, "wb")
        cmd = [str(server_binary()), "serve", "--listen", "127.0.0.1:0", "--ready-file", str(ready)]
        cmd += ["--engine", "cpu", "--policy", "asp", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            text = ready.read_text().strip() if ready.exists() else ""
            if re.fullmatch(r"http://[^\s/]+:\d+", text):
                try:
                    self.url = text
                    self.get_json("/api/status")
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.close()
                pytest.fail(f"server not ready after 120 s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.ws_url = "ws://" + self.url[len("http://") :] + "/ws"

    def log_tail(self) -> str:
        self.log.flush()
        return self.log_path.read_bytes()[-4000:].decode(errors="replace")

    def get(self, path: str) -> Tuple[bytes, Dict[str, str]]:
        with NO_PROXY.open(self.url + path, timeout=TIMEOUT) as r:
            return r.read(), {k.lower(): v for k, v in r.headers.items()}

    def get_json(self, path: str) -> Dict[str, Any]:
        return json.loads(self.get(path)[0])

    def replica_at(self, version: int) -> Dict[str, Any]:
        """/api/replica, polled until its version is `version`."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            r = self.get_json("/api/replica")
            if r["version"] == version:
                return r
            assert r["version"] < version, f"/api/replica went past version {version}: {r}"
            assert time.monotonic() < deadline, f"/api/replica stuck at {r}, waiting for {version}"
            time.sleep(0.02)

    def status_when(self, pred: Callable[[Dict[str, Any]], bool]) -> Dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT
        while True:
            s = self.get_json("/api/status")
            if pred(s):
                return s
            assert time.monotonic() < deadline, f"/api/status never satisfied the condition: {s}"
            time.sleep(0.02)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def launch():
    """Starts servers (the given extra flags) and stops them after the module."""
    servers: List[Server] = []
    with tempfile.TemporaryDirectory(prefix="sparsync-doc-") as tmp:

        def start(*args: str) -> Server:
            d = Path(tmp) / str(len(servers))
            d.mkdir()
            s = Server(list(args), d)
            servers.append(s)
            return s

        try:
            yield start
        finally:
            for s in servers:
                s.close()


@pytest.fixture(scope="module")
def server(launch) -> Server:
    """The default server (mlp, ASP, broadcast every step), shared by the tests of this module."""
    return launch()


# --- the client ---------------------------------------------------------------------------


def ws_connect(url: str):
    """A sync WebSocket connection: no compression, no proxy, no message size limit."""
    kw: Dict[str, Any] = {"max_size": None, "compression": None, "open_timeout": TIMEOUT}
    if "proxy" in inspect.signature(connect).parameters:  # websockets >= 15
        kw["proxy"] = None
    # Entered as a context manager: websockets >= 17.1 warns about a bare connect().
    return connect(url, **kw).__enter__()


class Session:
    """One session, kept as the document describes: the replica is the last Snapshot plus the
    Deltas that continue it; text frames are queued as control messages."""

    def __init__(self, server: Server, client_id: str, model: str = "mlp", **hello: Any) -> None:
        self.server = server
        self.ws = ws_connect(server.ws_url)
        msg = {"type": "hello", "protocol": 1, "client_id": client_id, "kind": "synthetic", "model": model}
        msg.update(hello)
        self.ws.send(json.dumps(msg))
        self.controls: List[Dict[str, Any]] = []
        self.frames: List[Dict[str, Any]] = []  # every Delta and Snapshot, in arrival order
        self.awaiting_snapshot = False
        # "welcome (text) … Snapshot (binary) … directive (text)", in this order.
        first = self.recv()
        assert isinstance(first, str), "the first answer to a hello must be a text frame"
        self.welcome = json.loads(first)
        assert self.welcome.get("type") == "welcome", self.welcome
        self.params = self.welcome["params"]
        second = self.recv()
        assert isinstance(second, bytes), "after the welcome comes the Snapshot (binary)"
        snap = parse_server_frame(second, self.params)
        assert snap["kind"] == "snapshot"
        self.first_snapshot = snap
        self.frames.append(snap)
        self.replica = snap["values"].copy()
        self.version = snap["version"]
        third = self.recv()
        assert isinstance(third, str), "after the Snapshot comes the directive (text)"
        self.directive = json.loads(third)
        assert self.directive.get("type") == "directive", self.directive

    def recv(self, timeout: float = TIMEOUT):
        return self.ws.recv(timeout=timeout)

    def handle(self, msg) -> None:
        if isinstance(msg, str):
            self.controls.append(json.loads(msg))
            return
        f = parse_server_frame(msg, self.params)
        self.frames.append(f)
        if f["kind"] == "snapshot":
            assert f["n"] == self.params
            self.replica = f["values"].copy()
            self.version = f["version"]
            self.awaiting_snapshot = False
        elif self.awaiting_snapshot:
            pass  # "ignores Deltas until the Snapshot arrives"
        else:
            assert f["base_version"] == self.version, (
                f"a Delta from {f['base_version']} to {f['version']} does not continue the "
                f"replica at version {self.version}"
            )
            apply_entries(self.replica, f["idx"], f["h"])
            self.version = f["version"]

    def pump_until(self, cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; controls so far: {self.controls}"
            self.handle(self.recv(left))

    def pump_for(self, seconds: float) -> None:
        """Handles whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                self.handle(self.recv(left))
            except TimeoutError:
                return

    def control(self, pred: Callable[[Dict[str, Any]], bool], timeout: float = TIMEOUT) -> Dict[str, Any]:
        """The first queued control message matching `pred` (removed from the queue)."""
        found: List[Dict[str, Any]] = []

        def have() -> bool:
            for i, m in enumerate(self.controls):
                if pred(m):
                    found.append(self.controls.pop(i))
                    return True
            return False

        self.pump_until(have, timeout)
        return found[0]

    def answer_to(self, seq: int) -> Dict[str, Any]:
        """The ack or reject naming Push `seq`."""
        return self.control(lambda m: m.get("type") in ("ack", "reject") and m.get("seq") == seq)

    def next_error(self) -> Dict[str, Any]:
        return self.control(lambda m: m.get("type") == "error")

    def deltas(self) -> List[Dict[str, Any]]:
        return [f for f in self.frames if f["kind"] == "delta"]

    def push(self, seq: int, idx, vals, base: Optional[int] = None, **kw: Any) -> None:
        self.ws.send(push_frame(self.version if base is None else base, seq, idx, vals, **kw))

    def check_replica(self) -> Dict[str, Any]:
        """The replica's checksum equals /api/replica's at the same replica version."""
        r = self.server.replica_at(self.version)
        assert r["params"] == self.params
        assert re.fullmatch(r"[0-9a-f]{16}", r["checksum"]), r
        assert checksum(self.replica) == r["checksum"], f"replica at version {self.version} differs"
        return r

    def close(self) -> None:
        try:
            self.ws.send(json.dumps({"type": "bye", "reason": "test done"}))
        except ConnectionClosed:
            pass
        self.ws.close()


def raw_hello(server: Server, msg: Any) -> Tuple[Dict[str, Any], int]:
    """Sends one first message (dict: as JSON text; bytes: binary), returns the answer (which
    must be an `error`) and the close code that follows it."""
    with ws_connect(server.ws_url) as ws:
        ws.send(msg if isinstance(msg, bytes) else json.dumps(msg))
        answer = json.loads(ws.recv(timeout=TIMEOUT))
        try:
            extra = ws.recv(timeout=TIMEOUT)
            pytest.fail(f"after a fatal error the server sent {extra!r} instead of closing")
        except ConnectionClosed as e:
            assert e.rcvd is not None, "the server closed without a close frame"
            return answer, e.rcvd.code


def hello(client_id: str, **kw: Any) -> Dict[str, Any]:
    m = {"type": "hello", "protocol": 1, "client_id": client_id, "kind": "synthetic", "model": "mlp"}
    m.update(kw)
    return m


# --- the tests ----------------------------------------------------------------------------


def test_splitmix64_reference_value():
    assert SplitMix64(0).next() == 0xE220A8397B1DCDAF


def test_handshake(server):
    s = Session(server, "doc-handshake", device="pytest")
    try:
        w = s.welcome
        for field in ("protocol", "session", "model", "layout", "params", "version", "settings", "resume_secret"):
            assert field in w, f"welcome lacks {field}: {w}"
        assert w["protocol"] == 1
        assert isinstance(w["session"], int)
        assert w["model"] == "mlp"
        assert [(t["name"], list(t["shape"])) for t in w["layout"]] == LAYOUTS["mlp"]
        assert w["params"] == MLP_PARAMS == 101_770
        assert isinstance(w["version"], int)
        assert re.fullmatch(r"[0-9a-f]{32}", w["resume_secret"]), w["resume_secret"]
        st = w["settings"]
        for field in ("policy", "rho_up", "rho_down", "max_staleness", "max_nnz", "max_frame_bytes",
                      "max_delta_chain", "max_push_rate"):
            assert field in st, f"welcome.settings lacks {field}: {st}"
        assert st["policy"] == "asp"
        assert st["max_nnz"] <= MLP_PARAMS
        # "40 + 6·params + 65,536 bytes (676,196 for mlp)"
        assert st["max_frame_bytes"] == 40 + 6 * MLP_PARAMS + 65_536 == 676_196

        # The Snapshot that follows has the welcome's version and the whole model.
        assert s.first_snapshot["version"] == w["version"]
        assert s.first_snapshot["n"] == MLP_PARAMS
        # "initial local steps, batch size, lr"
        for field in ("local_steps", "batch_size", "learning_rate"):
            assert field in s.directive, f"the initial directive lacks {field}: {s.directive}"
        assert (s.directive["local_steps"], s.directive["batch_size"]) == (10, 32)
        assert s.directive["learning_rate"] == pytest.approx(0.05)

        s.check_replica()

        # A fresh server (seed 0) starts from the documented initialisation.
        if w["version"] == 0:
            assert np.array_equal(s.replica.view(np.uint32), initial_model(LAYOUTS["mlp"], 0).view(np.uint32))
    finally:
        s.close()


def test_initialisation_cnn(launch):
    """The documented SplitMix64 initialisation, for convolutions' fan-in/fan-out and a seed."""
    srv = launch("--model", "cnn", "--seed", "5")
    s = Session(srv, "doc-init", model="cnn")
    try:
        assert [(t["name"], list(t["shape"])) for t in s.welcome["layout"]] == LAYOUTS["cnn"]
        assert s.params == param_count(LAYOUTS["cnn"])
        assert s.version == 0
        expect = initial_model(LAYOUTS["cnn"], 5)
        got = s.replica
        bad = np.flatnonzero(got.view(np.uint32) != expect.view(np.uint32))
        assert bad.size == 0, f"{bad.size} values differ, first at {bad[0]}: {got[bad[0]]!r} vs {expect[bad[0]]!r}"
        s.check_replica()
    finally:
        s.close()


def test_push_ack_and_delta(server):
    s = Session(server, "doc-push")
    try:
        tau = s.version
        idx = np.array([3, 1_000, 50_000, 101_769], dtype=np.uint32)
        vals = np.array([0.25, -0.125, 0.0625, -0.5], dtype=np.float16)
        before = s.replica.copy()
        s.push(1, idx, vals, base=tau)
        ack = s.answer_to(1)
        assert ack["type"] == "ack", ack
        assert set(ack) >= {"seq", "version", "staleness"}
        assert ack["staleness"] == ack["version"] - tau
        # ASP acknowledges on receipt; with broadcast_every 1 the versions are equal between steps.
        assert ack["staleness"] == 0

        s.pump_until(lambda: any(d["base_version"] == tau for d in s.deltas()))
        d = next(d for d in s.deltas() if d["base_version"] == tau)
        assert d["version"] == tau + 1, "with --broadcast-every 1 each Delta advances the replica by 1"
        assert s.version == d["version"]
        s.check_replica()

        # g = Δ (one Push, α = 1, weight n/n), m = g, x = x + m: the Delta carries the f16 of
        # x − x̂ at the pushed entries, which are the largest of d (k = ⌈rho_down·params⌉ ≥ 4).
        k = math.ceil(s.welcome["settings"]["rho_down"] * s.params)
        assert len(d["idx"]) == k, "a Delta carries the k entries of largest |x − x̂|"
        assert set(idx.tolist()) <= set(d["idx"].tolist())
        x_after = before.copy()
        apply_entries(x_after, idx.astype(np.int64), vals)
        expect_h = (x_after[idx] - before[idx]).astype(np.float16)
        pos = np.searchsorted(d["idx"], idx)
        assert np.array_equal(d["h"][pos].view(np.uint16), expect_h.view(np.uint16)), (d["h"][pos], expect_h)
    finally:
        s.close()


def test_refusals(server):
    s = Session(server, "doc-refusals")
    try:
        P = s.params
        good_idx, good_vals = [7, 8], [0.01, -0.01]

        s.push(1, good_idx, good_vals)
        assert s.answer_to(1)["type"] == "ack"

        def rejected(seq: int, field: str) -> Dict[str, Any]:
            r = s.answer_to(seq)
            assert r["type"] == "reject", r
            assert r["field"] == field, r
            assert isinstance(r.get("reason"), str) and r["reason"], r
            return r

        # seq: a duplicate (not above the last accepted seq).
        s.push(1, good_idx, good_vals)
        rejected(1, "seq")
        # indices: out of range, repeated, descending; values: not finite.
        s.push(2, [5, P], [0.01, 0.01])
        rejected(2, "indices")
        s.push(2, [5, 5], [0.01, 0.01])
        rejected(2, "indices")
        s.push(2, [9, 5], [0.01, 0.01])
        rejected(2, "indices")
        s.push(2, [5, 9], [0.01, np.inf])
        rejected(2, "values")
        # nnz: the length does not match, or over max_nnz.
        s.ws.send(push_frame(s.version, 2, [5, 9], [0.01, 0.01], nnz=3)[:-4])
        rejected(2, "nnz")
        s.ws.send(push_frame(s.version, 2, [], [], nnz=s.welcome["settings"]["max_nnz"] + 1))
        rejected(2, "nnz")
        s.ws.send(push_frame(s.version, 2, [5], [0.01], nnz=2, samples=0))  # nnz before samples
        rejected(2, "nnz")
        # samples 0; loss NaN / negative.
        s.push(2, good_idx, good_vals, samples=0)
        rejected(2, "samples")
        s.push(2, good_idx, good_vals, loss=float("nan"))
        rejected(2, "loss")
        s.push(2, good_idx, good_vals, loss=-1.0)
        rejected(2, "loss")
        # padding not zero (odd nnz).
        f = bytearray(push_frame(s.version, 2, [5], [0.01]))
        f[-1] = 1
        s.ws.send(bytes(f))
        rejected(2, "padding")
        # base_version in the future.
        s.push(2, good_idx, good_vals, base=s.version + 1_000)
        rejected(2, "base_version")
        # seq_gap: more than 2^20 above the last accepted.
        s.push(1 + 2**20 + 1, good_idx, good_vals)
        rejected(1 + 2**20 + 1, "seq_gap")

        # Frames whose Push header cannot be read: a non-fatal error without a seq.
        def error(frame: bytes, field: str) -> Dict[str, Any]:
            s.ws.send(frame)
            e = s.next_error()
            assert e["field"] == field, e
            assert e["fatal"] is False, e
            assert "seq" not in e, e
            assert isinstance(e["message"], str) and len(e["message"].encode()) <= 200, e
            return e

        error(b"SPSY", "length")  # shorter than 8 bytes
        error(push_frame(s.version, 2, good_idx, good_vals)[:20], "length")  # shorter than 40
        error(push_frame(s.version, 2, good_idx, good_vals, magic=b"SPSX"), "magic")
        e = error(push_frame(s.version, 2, good_idx, good_vals, version=2), "protocol_version")
        assert "2" in e["message"] and "1" in e["message"], e
        error(push_frame(s.version, 2, good_idx, good_vals, kind=DELTA), "kind")
        error(push_frame(s.version, 2, good_idx, good_vals, kind=9), "kind")
        error(push_frame(s.version, 2, good_idx, good_vals, flags=1), "flags")
        # The first failing check in the table's order names the field.
        error(b"", "length")
        error(PREFIX.pack(MAGIC, 1, PUSH, 0), "length")
        error(push_frame(s.version, 2, good_idx, good_vals, magic=b"XXXX", version=2), "magic")
        error(push_frame(s.version, 2, good_idx, good_vals, version=2, kind=9), "protocol_version")
        error(push_frame(s.version, 2, good_idx, good_vals, kind=9, flags=1), "kind")
        error(push_frame(s.version, 2, good_idx, good_vals, flags=1)[:20], "flags")
        error(push_frame(s.version, 2, good_idx, good_vals, kind=DELTA)[:20], "kind")
        # Control messages that are not valid: a non-fatal `json` error; a second hello: `handshake`.
        s.ws.send("not json")
        e = s.next_error()
        assert (e["field"], e["fatal"]) == ("json", False), e
        s.ws.send(json.dumps({"type": "no_such_type"}))
        e = s.next_error()
        assert (e["field"], e["fatal"]) == ("json", False), e
        s.ws.send(json.dumps(hello("doc-refusals")))
        e = s.next_error()
        assert (e["field"], e["fatal"]) == ("handshake", False), e

        # None of that used seq 2 up, and the session goes on.
        s.push(2, good_idx, good_vals)
        ack = s.answer_to(2)
        assert ack["type"] == "ack", ack
        s.pump_until(lambda: s.version >= ack["version"] + 1)
        s.check_replica()

        # snapshot_request: a Snapshot at the current replica version, also when up to date.
        n_snap = sum(f["kind"] == "snapshot" for f in s.frames)
        mine = s.replica.copy()
        s.ws.send(json.dumps({"type": "snapshot_request"}))
        s.pump_until(lambda: sum(f["kind"] == "snapshot" for f in s.frames) > n_snap)
        snap = [f for f in s.frames if f["kind"] == "snapshot"][-1]
        assert snap["version"] == server.get_json("/api/replica")["version"]
        assert np.array_equal(snap["values"].view(np.uint32), mine.view(np.uint32))
        s.check_replica()
        # After the Snapshot, Deltas continue from its version.
        s.push(3, good_idx, good_vals)
        assert s.answer_to(3)["type"] == "ack"
        s.pump_until(lambda: s.version > snap["version"])
        assert s.deltas()[-1]["base_version"] == snap["version"]
        s.check_replica()
    finally:
        s.close()


def test_refused_hellos(server):
    cases = [
        (hello("doc-bad-model", model="resnet"), "model", None),
        (hello("doc-bad-proto", protocol=2), "protocol",
         "protocol version mismatch: client speaks 2, server speaks 1"),
        (hello("doc-bad-field", x=1), "handshake", "unknown field `x`"),
        ({k: v for k, v in hello("doc-no-kind").items() if k != "kind"}, "handshake",
         "missing field `kind`"),
        (hello("bad id!"), "client_id", None),
        ({"type": "snapshot_request"}, "handshake", None),
        (push_frame(0, 1, [1], [0.5]), "handshake", None),  # a binary first message
    ]
    for msg, field, text in cases:
        answer, code = raw_hello(server, msg)
        assert answer["type"] == "error", answer
        assert answer["field"] == field, (msg, answer)
        assert answer["fatal"] is True, answer
        if text:
            assert text in answer["message"], answer
        assert code == 1008, (msg, code)


def test_reconnect_needs_resume_secret(server):
    a = Session(server, "doc-resume")
    try:
        answer, code = raw_hello(server, hello("doc-resume"))
        assert (answer["type"], answer["field"], code) == ("error", "client_id", 1008), answer
        b = Session(server, "doc-resume", resume_secret=a.welcome["resume_secret"])
        try:
            assert b.welcome["resume_secret"] == a.welcome["resume_secret"]
            bye = a.control(lambda m: m.get("type") == "bye")
            assert "replaced" in bye["reason"], bye
            with pytest.raises(ConnectionClosed) as e:
                a.pump_for(TIMEOUT)
                a.recv(TIMEOUT)
            assert e.value.rcvd is not None and e.value.rcvd.code == 1000
        finally:
            b.close()
    finally:
        a.ws.close()


def test_versions_between_steps(server):
    """With --broadcast-every 1 the model and replica versions are equal between steps."""
    s = Session(server, "doc-versions")
    try:
        st = server.status_when(lambda st: st["replica_version"] == s.welcome["version"])
        assert st["version"] == st["replica_version"], st
        assert server.get_json("/api/replica")["version"] == s.welcome["version"]
        _, headers = server.get("/api/model.safetensors")
        assert int(headers["x-sparsync-version"]) == st["version"]
    finally:
        s.close()


def test_model_and_replica_versions(launch):
    """--broadcast-every 2: the replica version trails the model version; Deltas advance it by 2."""
    srv = launch("--broadcast-every", "2")
    s = Session(srv, "doc-every2")
    try:
        assert s.version == 0
        s.push(1, [10, 20], [0.5, -0.5], base=0)
        a1 = s.answer_to(1)
        assert (a1["type"], a1["version"], a1["staleness"]) == ("ack", 0, 0), a1
        st = srv.status_when(lambda st: st["version"] == 1)
        assert st["replica_version"] == 0, st
        assert srv.get_json("/api/replica")["version"] == 0
        _, headers = srv.get("/api/model.safetensors")
        assert int(headers["x-sparsync-version"]) == 1
        s.pump_for(0.5)
        assert s.deltas() == [], "no Delta after a step whose model version is not a multiple of 2"

        # A newcomer's welcome carries the replica version, not the model version.
        late = Session(srv, "doc-every2-late")
        assert late.welcome["version"] == late.first_snapshot["version"] == 0
        late.close()

        # A Push built on the newest replica already has staleness 1.
        s.push(2, [30], [0.25], base=0)
        a2 = s.answer_to(2)
        assert (a2["type"], a2["version"], a2["staleness"]) == ("ack", 1, 1), a2
        s.pump_until(lambda: len(s.deltas()) == 1)
        d = s.deltas()[0]
        assert (d["base_version"], d["version"]) == (0, 2), d
        s.check_replica()
        st = srv.status_when(lambda st: st["version"] == 2)
        assert st["replica_version"] == 2

        s.push(3, [40], [0.25], base=2)
        a3 = s.answer_to(3)
        assert (a3["type"], a3["version"], a3["staleness"]) == ("ack", 2, 0), a3
        srv.status_when(lambda st: st["version"] == 3)
        late = Session(srv, "doc-every2-late2")
        assert late.welcome["version"] == 2, "welcome.version is the replica version"
        late.check_replica()
        late.close()
        # τ above the model version is "in the future"; a τ behind it is accepted, and its Ack's
        # staleness is the model version at acceptance − τ.
        s.push(4, [50], [0.25], base=4)
        r = s.answer_to(4)
        assert (r["type"], r["field"]) == ("reject", "base_version"), r
        s.push(4, [50], [0.25], base=2)
        a4 = s.answer_to(4)
        assert (a4["type"], a4["version"], a4["staleness"]) == ("ack", 3, 1), a4
        s.pump_until(lambda: s.version == 4)
        assert s.deltas()[-1]["base_version"] == 2
        s.check_replica()
    finally:
        s.close()
