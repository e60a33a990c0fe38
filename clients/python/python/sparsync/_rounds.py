"""The round loop that :func:`sparsync.torch.join_training` and
:func:`sparsync.flower.start_numpy_client` share: stop after some rounds or seconds, push each
round's change, wait for its Ack (a rejected push's entries are back in the residual: the next
push carries them), apply what arrived, stop at a Bye or a closed connection, close."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ._native import Client, RejectedError, SparsyncError

#: What a round's training produced: (delta, samples, loss, local_steps, info).
Update = Tuple[np.ndarray, int, float, int, Dict[str, Any]]


def await_directive(client: Client, timeout: float = 2.0) -> None:
    """The first directive follows the first Snapshot: give it a moment to arrive."""
    deadline = time.monotonic() + timeout
    while not client.directive and time.monotonic() < deadline:
        client.sync(0.05)


def drain(client: Client, timeout: float = 0.05) -> Optional[str]:
    """Applies what arrived (Deltas, Snapshots) until nothing comes within ``timeout``. Returns
    why the server is done with this client (a Bye's reason, a fatal error), else None."""
    while True:
        ev = client.next_event(timeout)
        if ev is None:
            return None
        kind = ev.get("type")
        if kind == "bye":
            return str(ev.get("reason", ""))
        if kind == "error" and ev.get("fatal"):
            return f"error {ev.get('field')}: {ev.get('message')}"


def push_loss(loss: Any) -> float:
    """A loss as a push carries it: a value that is not a finite number ≥ 0 is sent as 0."""
    loss = float(loss)
    return loss if math.isfinite(loss) and loss >= 0.0 else 0.0


def run_rounds(
    client: Client,
    make_update: Callable[[int], Update],
    summary: Dict[str, Any],
    *,
    rounds: Optional[int],
    seconds: Optional[float],
    ack_timeout: float,
    start: float,
    after_round: Callable[[Dict[str, Any]], None] = lambda info: None,
    on_round: Optional[Callable[[Dict[str, Any]], Any]] = None,
    on_bye: Callable[[str], None] = lambda reason: None,
    rate_pause: float = 0.0,
    reconnect: Optional[bool] = None,
    reconnect_timeout: float = 120.0,
) -> Dict[str, Any]:
    """Runs rounds until ``rounds`` rounds or ``seconds`` seconds (both None: until the
    server says Bye or closes the connection), then closes ``client``. Each round:
    ``make_update(round)`` trains; its delta is pushed (Top-k with error feedback) and its Ack
    awaited; what arrived is applied; ``after_round(info)`` and ``on_round(info)`` run.
    Fills ``summary``'s ``rounds``, ``pushes``, ``acked``, ``rejected``, ``last_loss``,
    ``version``, ``stop``, ``seconds`` and ``reconnects``, and returns it.

    A lost connection (not a Bye) ends the run unless ``reconnect`` (by default: when the
    client was given several addresses, a leader and its standby): then ``client.reconnect``
    tries them in turn for up to ``reconnect_timeout`` seconds, sends the unanswered push
    again with its seq (applied once either way), and the rounds go on."""
    if reconnect is None:
        reconnect = len(client.servers) > 1
    summary.setdefault("reconnects", 0)

    def lost(e: SparsyncError) -> bool:
        """The connection was lost: True once connected again, False (with the stop set)
        when the run ends (a Bye ends it too)."""
        if str(e.reason).startswith("bye:"):
            summary["stop"] = f"server said {e.reason}"
            return False
        if not reconnect:
            summary["stop"] = f"connection closed ({e.reason})"
            return False
        try:
            client.reconnect(reconnect_timeout)
        except SparsyncError as again:
            summary["stop"] = f"connection closed ({e.reason}); no server took it again ({again.reason})"
            return False
        summary["reconnects"] += 1
        return True

    try:
        while True:
            if rounds is not None and summary["rounds"] >= rounds:
                summary["stop"] = f"reached {rounds} rounds"
                break
            if seconds is not None and time.monotonic() - start >= seconds:
                summary["stop"] = f"ran for {seconds} s"
                break
            round_ = summary["rounds"] + 1
            delta, samples, loss, local_steps, info = make_update(round_)
            try:
                seq = client.push(delta, max(1, int(samples)), push_loss(loss), local_steps=max(0, int(local_steps)))
                summary["pushes"] += 1
                info["seq"] = seq
                ack = client.wait_ack(seq, ack_timeout)
                summary["acked"] += 1
                info["staleness"] = ack.get("staleness")
                info["rejected"] = None
            except RejectedError as e:
                # The refused entries went back into the residual: the next push carries them.
                summary["rejected"] += 1
                info["rejected"] = f"{e.field}: {e.reason}"
                if e.field == "rate":
                    time.sleep(rate_pause)
                elif e.field == "busy":
                    # The server cannot make pushes durable now (its log is unreachable).
                    time.sleep(e.retry_after_s or rate_pause)
            except SparsyncError as e:
                if e.field != "connection":
                    raise
                if not lost(e):
                    break
                info["reconnected"] = client.server
            summary["rounds"] = round_
            summary["last_loss"] = float(loss)
            try:
                bye = drain(client)
            except SparsyncError as e:
                if e.field != "connection":
                    raise
                if not lost(e):
                    break
                info["reconnected"] = client.server
                bye = None
            if bye is not None:
                on_bye(bye)
            after_round(info)
            info["elapsed"] = time.monotonic() - start
            if on_round is not None:
                on_round(info)
            if bye is not None:
                summary["stop"] = f"server said bye ({bye})"
                break
        summary["version"] = client.version
    finally:
        summary["seconds"] = time.monotonic() - start
        try:
            client.close(summary["stop"] or "error")
        except SparsyncError:
            pass
    return summary
