"""The Python client against a real server: the replica, Top-k with error feedback, refusals,
slow readers, and training beside the native client."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import MLP_LAYOUT, MLP_PARAMS, fnv1a64, log_tail, wait_event
from sparsync import Client, RejectedError, SparsyncError, __version__


def random_delta(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    return (rng.standard_normal(n) * scale).astype(np.float32)


def wait_version_above(c: Client, version: int, timeout: float = 30.0) -> list:
    """Handles events until the replica passes `version`; returns the events."""
    deadline = time.monotonic() + timeout
    events = []
    while c.version <= version:
        if time.monotonic() > deadline:
            pytest.fail(f"the replica stayed at {c.version} for {timeout} s; events {events}")
        ev = c.next_event(0.5)
        if ev is not None:
            events.append(ev)
    return events


def test_session_facts(server, clients):
    c = clients(server.ws, "py-facts")
    assert isinstance(__version__, str) and __version__
    assert c.model == "mlp"
    assert c.num_params == MLP_PARAMS
    assert [(name, tuple(shape)) for name, shape in c.layout] == MLP_LAYOUT
    assert isinstance(c.session, int)
    assert re.fullmatch(r"[0-9a-f]{32}", c.resume_secret)
    s = c.settings
    assert s["policy"] == "asp"
    for key in ("rho_up", "rho_down", "max_staleness", "max_nnz", "max_frame_bytes", "max_delta_chain", "max_push_rate"):
        assert key in s, key
    assert s["max_nnz"] == MLP_PARAMS
    # The first directive follows the Snapshot: it may still be on its way.
    deadline = time.monotonic() + 5
    while not c.directive and time.monotonic() < deadline:
        c.sync(0.1)
    d = c.directive
    assert d["local_steps"] == 10 and d["batch_size"] == 32
    assert math.isclose(d["learning_rate"], 0.05)
    x = c.replica()
    assert x.dtype == np.float32 and x.shape == (MLP_PARAMS,)
    assert np.all(np.isfinite(x)) and np.any(x != 0)
    # The replica is the seeded initialisation: biases zero, weights within Glorot's limit.
    assert np.all(x[784 * 128 : 784 * 128 + 128] == 0)
    assert np.max(np.abs(x[: 784 * 128])) <= math.sqrt(6 / (784 + 128)) * (1 + 1e-6)
    # checksum() is FNV-1a 64 of the f32 little-endian bytes, as /api/replica's.
    assert c.checksum() == fnv1a64(x)
    r = server.replica()
    assert r["params"] == MLP_PARAMS
    assert (c.version, c.checksum()) == (r["version"], r["checksum"])
    res = c.residual()
    assert res.dtype == np.float64 and res.shape == (MLP_PARAMS,) and not np.any(res)
    # /api/status lists the session (it is republished at most every 100 ms).
    deadline = time.monotonic() + 5
    while "py-facts" not in [cl["client_id"] for cl in server.status()["clients"]]:
        assert time.monotonic() < deadline, "the session never showed in /api/status"
        time.sleep(0.05)


def test_replica_is_bit_identical_after_every_delta(server, clients):
    c = clients(server.ws, "py-replica")
    rng = np.random.default_rng(1)
    for i in range(10):
        before = c.version
        seq = c.push(random_delta(rng, c.num_params, 1e-2), samples=32, loss=1.0, local_steps=10)
        ack = c.wait_ack(seq)
        assert ack["type"] == "ack" and ack["seq"] == seq
        assert ack["staleness"] >= 0
        events = wait_version_above(c, before)
        r = server.catch_up(c)
        assert c.version == r["version"] > before, f"push {i}"
        assert c.checksum() == r["checksum"], f"push {i}: replica differs at version {r['version']} ({events})"
    # The client's own checksum is what its values hash to.
    assert c.checksum() == fnv1a64(c.replica())


def test_replica_is_bit_identical_after_a_snapshot(server, clients):
    c = clients(server.ws, "py-snap")
    rng = np.random.default_rng(2)
    for _ in range(3):
        c.wait_ack(c.push(random_delta(rng, c.num_params, 1e-2), samples=32, loss=1.0))
    server.assert_same_replica(c)
    c.request_snapshot()
    ev = wait_event(c, "snapshot", 5.0)
    assert ev["version"] == c.version
    assert ev["bytes"] >= 4 * c.num_params
    server.assert_same_replica(c)
    # Deltas continue from the snapshot.
    before = c.version
    c.wait_ack(c.push(random_delta(rng, c.num_params, 1e-2), samples=32, loss=1.0))
    wait_version_above(c, before)
    server.assert_same_replica(c)


def sent_part(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """What a push sent, from the residual before (plus the delta) and after: exact in f64."""
    return before - after


def check_sent(sent: np.ndarray, k: int) -> None:
    nz = np.flatnonzero(sent)
    assert nz.size == k, f"sent {nz.size} entries, expected k = {k}"
    v = sent[nz]
    assert np.array_equal(v.astype(np.float16).astype(np.float64), v), "sent values are not f16 values"


def test_top_k_with_error_feedback_loses_nothing(server, clients):
    c = clients(server.ws, "py-topk")
    n = c.num_params
    k = math.ceil(0.01 * n)
    assert k == 1018
    assert not np.any(c.residual())
    rng = np.random.default_rng(3)
    d = random_delta(rng, n, 1e-2)
    d64 = d.astype(np.float64)
    c.wait_ack(c.push(d, samples=32, loss=0.5, rho=0.01))
    r = c.residual()
    sent = [sent_part(d64, r)]
    check_sent(sent[0], k)
    # The k largest |d| were sent (ties aside: none sent is smaller than any kept).
    mask = sent[0] != 0
    assert np.min(np.abs(d64[mask])) >= np.max(np.abs(d64[~mask]))
    # Unsent entries are kept exactly; sent ones keep their f16 rounding error.
    assert np.array_equal(r[~mask], d64[~mask])
    assert np.array_equal(sent[0] + r, d64)
    # Pushing nothing new sends k entries of the residual each time.
    zeros = np.zeros(n, dtype=np.float32)
    for _ in range(5):
        prev = r
        c.wait_ack(c.push(zeros, samples=1, loss=0.0, rho=0.01))
        r = c.residual()
        sent.append(sent_part(prev, r))
        check_sent(sent[-1], k)
    # residual + every sent part == d, exactly: adding the parts back newest first gives each
    # earlier residual (a representable value) at every step.
    acc = r.copy()
    for s in reversed(sent):
        acc = acc + s
    assert np.array_equal(acc, d64)
    # The default density is the server's rho_up (0.01 here): the same k.
    prev = r
    c.wait_ack(c.push(zeros, samples=1, loss=0.0))
    check_sent(sent_part(prev, c.residual()), math.ceil(c.settings["rho_up"] * n))


def raised(excinfo) -> str:
    e = excinfo.value
    return f"{type(e).__name__}(field={getattr(e, 'field', None)!r}, reason={getattr(e, 'reason', None)!r})"


def push_raw_refused(c: Client, field: str, indices, values, samples=1, loss=0.0, **kw) -> SparsyncError:
    """push_raw (and its answer) must fail naming `field`."""
    seq = None
    with pytest.raises(SparsyncError) as ei:
        seq = c.push_raw(np.asarray(indices, dtype=np.uint32), np.asarray(values, dtype=np.float32), samples, loss, **kw)
        c.wait_ack(seq, timeout=10)
    assert ei.value.field == field, raised(ei)
    assert isinstance(ei.value.reason, str) and ei.value.reason
    if isinstance(ei.value, RejectedError):
        assert ei.value.seq == seq
        # Only a busy server asks for a wait.
        assert ei.value.retry_after_s is None
    return ei.value


def test_bad_input_names_the_field(server, clients):
    n = MLP_PARAMS
    with pytest.raises(SparsyncError) as ei:
        Client(server.ws, "py-wrong-model", model="cnn", timeout=10)
    assert ei.value.field == "model", raised(ei)
    with pytest.raises(SparsyncError) as ei:
        Client(server.ws, "bad id!", timeout=10)
    assert ei.value.field == "client_id", raised(ei)
    with pytest.raises(SparsyncError) as ei:
        Client("ws://127.0.0.1:9/ws", "py-nowhere", timeout=5)
    assert ei.value.field == "connection", raised(ei)

    c = clients(server.ws, "py-bad")
    # Refused by the client before anything is sent.
    with pytest.raises(SparsyncError) as ei:
        c.push(np.zeros(10, dtype=np.float32), 1, 0.0)
    assert ei.value.field == "delta", raised(ei)
    bad = np.zeros(n, dtype=np.float32)
    bad[7] = np.nan
    with pytest.raises(SparsyncError) as ei:
        c.push(bad, 1, 0.0)
    assert ei.value.field == "delta", raised(ei)
    ok = np.full(n, 1e-4, dtype=np.float32)
    with pytest.raises(SparsyncError) as ei:
        c.push(ok, 0, 0.0)
    assert ei.value.field == "samples", raised(ei)
    for loss in (-1.0, float("nan"), float("inf")):
        with pytest.raises(SparsyncError) as ei:
            c.push(ok, 1, loss)
        assert ei.value.field == "loss", raised(ei)
    assert not np.any(c.residual()), "a refused push must leave the residual alone"

    # Refused by the server (a reject naming the field), the session going on.
    push_raw_refused(c, "indices", [1, n], [0.01, 0.01])
    push_raw_refused(c, "indices", [5, 5], [0.01, 0.01])
    push_raw_refused(c, "indices", [6, 2], [0.01, 0.01])
    push_raw_refused(c, "values", [1, 2], [0.01, np.inf])
    push_raw_refused(c, "samples", [1, 2], [0.01, 0.01], samples=0)
    push_raw_refused(c, "loss", [1, 2], [0.01, 0.01], loss=-1.0)
    push_raw_refused(c, "base_version", [1, 2], [0.01, 0.01], base_version=c.version + 1000)

    # A duplicate seq is rejected naming "seq"; the next push goes through.
    seq = c.push_raw(np.array([3, 4], dtype=np.uint32), np.array([0.01, -0.01], dtype=np.float32), 1, 0.0)
    c.wait_ack(seq, timeout=10)
    err = push_raw_refused(c, "seq", [3], [0.01], seq=seq)
    assert isinstance(err, RejectedError)
    c.wait_ack(c.push(ok, 1, 0.1), timeout=10)

    # A second live session of the same client id, without the resume secret.
    with pytest.raises(SparsyncError) as ei:
        Client(server.ws, "py-bad", timeout=10)
    assert ei.value.field == "client_id", raised(ei)
    # The first one is still served.
    c.wait_ack(c.push(ok, 1, 0.1), timeout=10)
    server.assert_same_replica(c)

    # A closed client says so.
    c.close()
    with pytest.raises(SparsyncError) as ei:
        c.push(ok, 1, 0.1)
    assert ei.value.field == "connection", raised(ei)


def test_resume_secret_replaces_the_session(server, clients):
    c1 = clients(server.ws, "py-resume")
    c2 = clients(server.ws, "py-resume", resume_secret=c1.resume_secret)
    assert c2.session != c1.session
    assert c2.resume_secret == c1.resume_secret
    got = None
    deadline = time.monotonic() + 10
    try:
        while got is None and time.monotonic() < deadline:
            ev = c1.next_event(1.0)
            if ev is not None and ev["type"] == "bye":
                got = ev["reason"]
    except SparsyncError as e:
        assert e.field == "connection"
        got = "closed"
    assert got, "the replaced session was not ended"
    c2.wait_ack(c2.push(np.full(c2.num_params, 1e-3, dtype=np.float32), 1, 0.0))


def test_evaluator_reports(server, clients):
    ev = clients(server.ws, "py-eval", role="evaluator")
    ev.report_eval(ev.version, 0.5, 1.25, 100)
    deadline = time.monotonic() + 10
    while server.status()["evals_seen"] < 1:
        assert time.monotonic() < deadline, "the evaluation never showed in /api/status"
        time.sleep(0.05)
    assert server.status()["evals"][-1]["accuracy"] == 0.5
    # Out of range: a non-fatal error naming "eval"; evaluators may not push.
    ev.report_eval(ev.version, 2.0, 1.0, 100)
    err = wait_event(ev, "error", 10.0)
    assert err["field"] == "eval" and not err["fatal"]
    push_raw_refused(ev, "role", [1], [0.01])


def test_a_slow_reader_gets_the_missed_chain_or_a_snapshot(start_server, clients):
    # A budget smaller than one mlp Delta (6,140 bytes at rho_down 0.01): a session whose
    # socket does not take a Delta at once lags and is resynchronised (with a larger budget the
    # kernel's socket buffers can hold all 30 Deltas, and the slow client reads the chain).
    srv = start_server(max_pending_bytes=4096)
    slow = clients(srv.ws, "py-slow")
    v0 = slow.version
    fast = clients(srv.ws, "py-fast")
    rng = np.random.default_rng(5)
    for _ in range(30):
        fast.wait_ack(fast.push(random_delta(rng, fast.num_params, 1e-2), samples=32, loss=1.0))
    target = srv.assert_same_replica(fast)["version"]
    assert target > v0
    # Now the slow client reads what was queued for it.
    events = []
    deadline = time.monotonic() + 60
    while True:
        ev = slow.next_event(1.0)
        if ev is not None:
            events.append(ev)
        elif slow.version == target:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"slow client at {slow.version}, server at {target}; events {events}")
    kinds = [e["type"] for e in events]
    states = [e for e in events if e["type"] in ("delta", "snapshot")]
    assert states and states[-1]["version"] == target, kinds
    if "snapshot" not in kinds:
        # No gap: every replica version from where it was to the server's, one Delta each.
        assert [e["version"] for e in states] == list(range(v0 + 1, target + 1)), kinds
    r = srv.assert_same_replica(slow)
    assert r["version"] == target
    # An up-to-date client that asks for a snapshot gets one.
    fast.request_snapshot()
    snap = wait_event(fast, "snapshot", 5.0)
    assert snap["version"] == target
    srv.assert_same_replica(fast)


def test_python_and_native_clients_train_together(server, clients, native_client_bin, tmp_path):
    log = tmp_path / "native-1.log"
    report = tmp_path / "native-1.json"
    args = [
        str(native_client_bin), "--server", server.ws, "--id", "native-1", "--model", "mlp",
        "--max-rounds", "20", "--no-reconnect", "--report", str(report),
    ]
    with open(log, "wb") as out:
        native = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        c = clients(server.ws, "py-together")
        rng = np.random.default_rng(6)
        seen = set()
        for _ in range(20):
            c.wait_ack(c.push(random_delta(rng, c.num_params, 1e-3), samples=32, loss=1.0), timeout=60)
            c.sync(0.0)
            seen |= {cl["client_id"] for cl in server.status()["clients"]}
        # /api/status is republished at most every 100 ms: the Python session shows up soon.
        deadline = time.monotonic() + 5
        while "py-together" not in seen and time.monotonic() < deadline:
            time.sleep(0.05)
            seen |= {cl["client_id"] for cl in server.status()["clients"]}
        rc = native.wait(timeout=600)
    finally:
        if native.poll() is None:
            native.kill()
            native.wait()
    assert rc == 0, f"sparsync-client exited with {rc}:\n{log_tail(log)}"
    summary = json.loads(report.read_text())
    # Each plain round is one push, answered before the next round starts.
    assert (summary["rounds"], summary["pushes"], summary["acked"], summary["rejected"]) == (20, 20, 20, 0), summary
    # Both joined and both were accepted (the record names every session's client id).
    events = server.record()
    ids = {e["session"]: e["client_id"] for e in events if e["event"] == "join"}
    accepted = {}
    for e in events:
        if e["event"] == "accept":
            accepted[ids[e["session"]]] = accepted.get(ids[e["session"]], 0) + 1
    assert accepted.get("py-together") == 20, accepted
    assert accepted.get("native-1") == 20, accepted
    assert "py-together" in seen
    deadline = time.monotonic() + 5
    while server.status()["accepted"] < 40:
        assert time.monotonic() < deadline, server.status()["accepted"]
        time.sleep(0.05)
    server.assert_same_replica(c)


def test_wait_ack_finds_answers_other_calls_consumed(server, clients):
    c = clients(server.ws, "py-answers")
    rng = np.random.default_rng(7)
    a = c.push(random_delta(rng, c.num_params, 1e-2), samples=1, loss=0.1)
    b = c.push(random_delta(rng, c.num_params, 1e-2), samples=1, loss=0.1)
    assert c.wait_ack(b)["seq"] == b
    c.sync(0.2)
    # a's Ack was handled by the calls above: it is still found, at once.
    assert c.wait_ack(a, timeout=float("inf"))["seq"] == a
    with pytest.raises(SparsyncError) as e:
        c.wait_ack(b + 100)
    assert e.value.field == "seq"
    with pytest.raises(SparsyncError) as e:
        c.push(np.zeros(c.num_params, dtype=np.float32), samples=1, loss=1e39)
    assert e.value.field == "loss"


def wait_accepted(server, client_id: str, n: int, timeout: float = 10.0) -> None:
    """Waits until `server`'s status shows at least `n` pushes of `client_id` accepted (the
    status is republished at most every 100 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        me = next((x for x in server.status()["clients"] if x["client_id"] == client_id), None)
        if (me and me["accepted"] >= n) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert me and me["accepted"] >= n, me


def test_reconnect_moves_on_and_a_resent_push_is_applied_once(start_server, clients, tmp_path):
    # A server with a file WAL is killed (-9) while the client's last push is unanswered; its
    # successor resumes from the same directory at the client's second address. The client
    # reconnects there and sends the push again with its seq: the server holds it already.
    state = tmp_path / "state"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = start_server(checkpoint_dir=str(state), wal=True)
    second = f"ws://127.0.0.1:{port}/ws"
    c = clients(f"{a.ws},{second}", "py-reconnect", timeout=10.0)
    assert c.servers == [a.ws, second] and c.server == a.ws
    rng = np.random.default_rng(11)
    n = c.num_params
    c.wait_ack(c.push(random_delta(rng, n, 1e-3), 8, 0.5), timeout=10)
    seq = c.push(random_delta(rng, n, 1e-3), 8, 0.5)
    # The server logs and acknowledges it meanwhile; the client has not read that.
    time.sleep(1.0)
    a.proc.kill()
    a.proc.wait(timeout=10)
    residual = c.residual()
    b = start_server(listen=f"127.0.0.1:{port}", resume=str(state), checkpoint_dir=str(state), wal=True)
    c.reconnect(timeout=30)
    assert c.server == second
    assert c.wait_ack(seq, timeout=10) == {"type": "ack", "seq": seq, "held": True}
    assert np.array_equal(c.residual(), residual), "a held push's entries are not put back into the residual"
    # The next push is taken by the new server.
    after = c.push(random_delta(rng, n, 1e-3), 8, 0.5)
    assert c.wait_ack(after, timeout=10)["seq"] == after
    wait_accepted(b, "py-reconnect", 1)
    # With no server at any address, reconnecting gives up after its timeout, naming them.
    b.stop()
    with pytest.raises(SparsyncError) as e:
        c.reconnect(timeout=1.0)
    assert e.value.field == "connection" and second in e.value.reason, raised(e)


def test_the_round_helper_moves_to_the_next_address_when_its_server_dies(start_server):
    from sparsync._rounds import run_rounds

    a = start_server()
    b = start_server()
    c = Client(f"{a.ws},{b.ws}", "py-rounds-move", timeout=10.0)
    rng = np.random.default_rng(3)

    def make_update(round_):
        if round_ == 4:
            # The first server dies (kill -9) before this round's push.
            a.proc.kill()
            a.proc.wait(timeout=10)
        return random_delta(rng, c.num_params, 1e-3), 8, 0.5, 1, {}

    summary = {"rounds": 0, "pushes": 0, "acked": 0, "rejected": 0, "last_loss": None, "version": None, "stop": ""}
    run_rounds(c, make_update, summary, rounds=8, seconds=None, ack_timeout=10.0, start=time.monotonic())
    assert summary["stop"] == "reached 8 rounds" and summary["reconnects"] == 1, summary
    assert summary["acked"] >= 6, summary
    wait_accepted(b, "py-rounds-move", 3)


def test_several_addresses_are_tried_in_turn(server, clients):
    # A leader and its standby (`serve --standby`): the first address does not serve, the
    # second does. Nothing listens on port 1 of the loopback.
    c = clients(f"ws://127.0.0.1:1/ws, {server.ws}", "py-two-addresses", timeout=5.0)
    assert c.model == "mlp"
    # None serving: the last address's error is raised, naming it.
    with pytest.raises(SparsyncError) as e:
        Client("ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws", "py-none", model="mlp", timeout=2.0)
    assert "127.0.0.1:2" in raised(e)
    # A refusal of the Hello is not tried elsewhere: every server of a log would refuse it.
    with pytest.raises(SparsyncError) as e:
        Client(f"{server.ws},ws://127.0.0.1:1/ws", "py-refused", model="cnn", timeout=5.0)
    assert "model" in raised(e)
