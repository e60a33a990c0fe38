"""A Flower-style adapter: run a ``NumPyClient`` against a sparsync server.

For code written for Flower (``flwr.client.NumPyClient``): the same three methods with the
same signatures, and :func:`start_numpy_client` in place of ``flwr.client.start_client``.
Flower is not needed (any object with a ``fit`` method works, a real
``flwr.client.NumPyClient`` included)::

    from sparsync.flower import NumPyClient, start_numpy_client

    class MyClient(NumPyClient):
        def fit(self, parameters, config):
            new = train(parameters, lr=config.get("learning_rate", 0.05))
            return new, 320, {"loss": 0.41}

    start_numpy_client("ws://127.0.0.1:7070/ws", MyClient(), "flower-1", rounds=100)

What differs from Flower: the server owns the model (it never asks for initial parameters),
and each ``fit`` result is sent as the *change* from the parameters it was given, compressed
with Top-k and error feedback; the next ``fit`` gets the server's newest replica x̂, not a
FedAvg of this round's clients (the server's policy decides how updates are combined).

Parameters are numpy float32 arrays in the server's layout shapes (linear weights
``[in, out]``). If ``get_parameters`` returns arrays whose 2-D shapes are the layout's
reversed (PyTorch's ``[out, in]``, e.g. from a ``state_dict``), ``fit`` and ``evaluate`` get and
return those tensors transposed instead; square matrices are passed as they are.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._native import Client
from ._rounds import Update, await_directive, push_loss, run_rounds

__all__ = ["NumPyClient", "start_numpy_client"]

Config = Dict[str, Any]
Metrics = Dict[str, Any]


class NumPyClient:
    """Base class with Flower's ``NumPyClient`` signatures. Override ``fit`` (required) and,
    optionally, ``evaluate`` and ``get_parameters``."""

    def get_properties(self, config: Config) -> Dict[str, Any]:
        return {}

    def get_parameters(self, config: Config) -> List[np.ndarray]:
        """The client's current parameters. Optional: sparsync only uses their shapes, to pass
        the client its own orientation of 2-D tensors. The default returns ``[]`` (layout
        shapes)."""
        return []

    def fit(self, parameters: List[np.ndarray], config: Config) -> Tuple[List[np.ndarray], int, Metrics]:
        """Trains from ``parameters``; returns ``(new_parameters, num_examples, metrics)``.
        ``metrics["loss"]`` (the training loss) is sent with the update."""
        raise NotImplementedError("a NumPyClient must implement fit(parameters, config)")

    def evaluate(self, parameters: List[np.ndarray], config: Config) -> Tuple[float, int, Metrics]:
        """Scores ``parameters``; returns ``(loss, num_examples, metrics)``."""
        raise NotImplementedError("this NumPyClient does not implement evaluate(parameters, config)")


def _orientation(client: Any, layout: Sequence[Tuple[str, Sequence[int]]], config: Config) -> List[bool]:
    """Per layout tensor: whether the client holds it transposed (from ``get_parameters``)."""
    getter = getattr(client, "get_parameters", None)
    current: Sequence[Any] = []
    if getter is not None:
        try:
            current = getter(config) or []
        except NotImplementedError:
            current = []
    if len(current) == 0:
        return [False] * len(layout)
    if len(current) != len(layout):
        names = ", ".join(n for n, _ in layout)
        raise ValueError(
            f"get_parameters returned {len(current)} arrays; the server's layout has "
            f"{len(layout)} tensors ({names})"
        )
    out = []
    for (name, shape), arr in zip(layout, current):
        shape = tuple(int(s) for s in shape)
        got = tuple(int(s) for s in np.shape(arr))
        if got == shape:
            out.append(False)
        elif len(shape) == 2 and got == shape[::-1]:
            out.append(True)
        else:
            raise ValueError(
                f"tensor {name!r}: the server's layout has shape {list(shape)}, get_parameters "
                f"gave {list(got)} (neither equal nor transposed)"
            )
    return out


def _unflatten(flat: np.ndarray, layout: Sequence[Tuple[str, Sequence[int]]], transpose: Sequence[bool]) -> List[np.ndarray]:
    """Independent float32 arrays (copies) of the flat vector, in the client's orientation."""
    arrays = []
    offset = 0
    for (name, shape), t in zip(layout, transpose):
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        a = np.array(flat[offset : offset + n], dtype=np.float32).reshape(shape)
        arrays.append(np.ascontiguousarray(a.T) if t else a)
        offset += n
    return arrays


def _flatten(arrays: Sequence[Any], layout: Sequence[Tuple[str, Sequence[int]]], transpose: Sequence[bool]) -> np.ndarray:
    """The flat float32 vector of ``arrays`` (in the client's orientation); checks shapes."""
    if len(arrays) != len(layout):
        raise ValueError(
            f"fit returned {len(arrays)} arrays; the server's layout has {len(layout)} tensors "
            f"({', '.join(n for n, _ in layout)})"
        )
    sizes = [math.prod(int(s) for s in shape) for _, shape in layout]
    out = np.empty(sum(sizes), dtype=np.float32)
    offset = 0
    for (name, shape), t, n, arr in zip(layout, transpose, sizes, arrays):
        shape = tuple(int(s) for s in shape)
        want = shape[::-1] if t else shape
        a = np.asarray(arr, dtype=np.float32)
        if a.shape != want:
            raise ValueError(f"tensor {name!r}: fit returned shape {list(a.shape)}, expected {list(want)}")
        out[offset : offset + n] = (a.T if t else a).reshape(-1)
        offset += n
    return out


def _config(c: Client, round_: int) -> Config:
    cfg: Config = {k: v for k, v in c.directive.items() if v is not None}
    cfg["server_round"] = round_
    cfg["version"] = c.version
    return cfg


def start_numpy_client(
    url: str,
    client: Any,
    client_id: str,
    model: Optional[str] = None,
    rounds: Optional[int] = None,
    seconds: Optional[float] = None,
    *,
    evaluate_every: int = 0,
    ack_timeout: float = 120.0,
    on_round: Optional[Callable[[Dict[str, Any]], Any]] = None,
    **client_kwargs: Any,
) -> Dict[str, Any]:
    """Runs ``client`` against the server at ``url`` for ``rounds`` rounds or ``seconds``
    seconds (both None: until the server says Bye or closes the connection).

    Each round: x̂ as a list of arrays → ``client.fit(arrays, config)`` (``config``: the
    server's directive, e.g. ``local_steps``, ``batch_size``, ``learning_rate``, plus
    ``server_round`` and ``version``) → the change (new − given, flattened) is pushed with
    ``samples = num_examples`` and ``loss = metrics["loss"]`` (0 when absent) → its Ack is
    awaited → the Deltas that arrived are applied. With ``evaluate_every = N > 0``,
    ``client.evaluate`` scores x̂ every N rounds. ``model=None`` takes the model the server
    serves (a name asserts it). Other keyword arguments go to :class:`sparsync.Client`
    (``token``, ``timeout``, …).

    Returns a summary: ``rounds``, ``pushes``, ``acked``, ``rejected``, ``version``, ``stop``,
    ``seconds``, ``evaluations`` (a list of ``(round, version, loss, num_examples,
    metrics)``).
    """
    start = time.monotonic()
    c = Client(url, client_id, model=model, **client_kwargs)
    summary: Dict[str, Any] = {
        "rounds": 0,
        "pushes": 0,
        "acked": 0,
        "rejected": 0,
        "version": c.version,
        "stop": "",
        "seconds": 0.0,
        "evaluations": [],
    }
    try:
        await_directive(c)
        layout = [(str(n), tuple(int(s) for s in shape)) for n, shape in c.layout]
        transpose = _orientation(client, layout, _config(c, 0))
    except BaseException:
        c.close("error")
        raise

    def make_update(round_: int) -> Update:
        config = _config(c, round_)
        base = np.asarray(c.replica(), dtype=np.float32)
        result = client.fit(_unflatten(base, layout, transpose), config)
        if not isinstance(result, (tuple, list)) or len(result) != 3:
            raise TypeError("fit did not return a tuple (parameters, num_examples, metrics)")
        new_arrays, num_examples, metrics = result
        delta = _flatten(new_arrays, layout, transpose) - base
        loss = push_loss((metrics or {}).get("loss", 0.0) or 0.0)
        info: Dict[str, Any] = {"round": round_, "samples": int(num_examples), "loss": loss}
        return delta, num_examples, loss, int(config.get("local_steps", 1) or 1), info

    def after_round(info: Dict[str, Any]) -> None:
        info["version"] = c.version
        round_ = info["round"]
        if evaluate_every > 0 and round_ % evaluate_every == 0:
            params = _unflatten(np.asarray(c.replica(), dtype=np.float32), layout, transpose)
            e_loss, e_n, e_metrics = client.evaluate(params, _config(c, round_))
            summary["evaluations"].append((round_, c.version, float(e_loss), int(e_n), dict(e_metrics or {})))
            info["evaluation"] = summary["evaluations"][-1]

    return run_rounds(
        c,
        make_update,
        summary,
        rounds=rounds,
        seconds=seconds,
        ack_timeout=ack_timeout,
        start=start,
        after_round=after_round,
        on_round=on_round,
    )
