"""PyTorch helper: train a ``torch.nn.Module`` against a sparsync server.

The server's model is a flat vector of named tensors (``Client.layout``). A module's
parameters are matched to it by name and shape: the same shape is copied as is; a 2-D tensor
whose shape is the layout's reversed is transposed. That covers ``torch.nn.Linear``, whose
weight is ``[out, in]`` where the layout (burn's and TensorFlow.js's convention) has
``[in, out]``. Anything else raises ``ValueError`` naming the tensor.

The built-in ``mlp`` is, in PyTorch::

    model = torch.nn.Sequential()          # or any module with these parameter names
    model.fc1 = torch.nn.Linear(784, 128)  # fc1.weight [128, 784] ↔ layout [784, 128]
    model.relu = torch.nn.ReLU()
    model.fc2 = torch.nn.Linear(128, 10)

``torch`` is imported when these functions run, so ``import sparsync`` works without it.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._native import Client, RejectedError
from ._rounds import Update, await_directive, drain, push_loss, run_rounds

__all__ = ["BUILTIN_LAYOUTS", "TorchClient", "join_training", "map_parameters", "Slot"]

#: The layouts of the server's built-in models (``src/protocol/model.rs``), for checking a
#: module before connecting. Linear weights are ``[inputs, outputs]``; convolution weights
#: ``[out_channels, in_channels, kh, kw]`` (as in PyTorch).
BUILTIN_LAYOUTS: Dict[str, List[Tuple[str, Tuple[int, ...]]]] = {
    "logreg": [("fc.weight", (784, 10)), ("fc.bias", (10,))],
    "mlp": [
        ("fc1.weight", (784, 128)),
        ("fc1.bias", (128,)),
        ("fc2.weight", (128, 10)),
        ("fc2.bias", (10,)),
    ],
    "cnn": [
        ("conv1.weight", (8, 1, 5, 5)),
        ("conv1.bias", (8,)),
        ("conv2.weight", (16, 8, 5, 5)),
        ("conv2.bias", (16,)),
        ("fc.weight", (256, 10)),
        ("fc.bias", (10,)),
    ],
}


class Slot:
    """Where one layout tensor lives: the module parameter, its offset in the flat vector, and
    whether the parameter is the layout tensor transposed."""

    __slots__ = ("name", "param_name", "param", "shape", "offset", "numel", "transpose")

    def __init__(self, name, param_name, param, shape, offset, numel, transpose):
        self.name = name
        self.param_name = param_name
        self.param = param
        self.shape = shape
        self.offset = offset
        self.numel = numel
        self.transpose = transpose

    def __repr__(self) -> str:
        how = "transposed" if self.transpose else "as is"
        return f"Slot({self.name!r} {list(self.shape)} <- {self.param_name!r} {how}, offset {self.offset})"


def map_parameters(
    module: Any,
    layout: Sequence[Tuple[str, Sequence[int]]],
    rename: Optional[Mapping[str, str]] = None,
    transpose: Iterable[str] = (),
) -> List[Slot]:
    """Matches ``module``'s parameters to ``layout`` (a ``Client.layout``, or an entry of
    :data:`BUILTIN_LAYOUTS`), tensor by tensor, in layout order.

    ``rename`` maps a layout name to the module's parameter name where they differ (e.g.
    ``{"fc1.weight": "0.weight"}`` for an ``nn.Sequential``). ``transpose`` names layout
    tensors to transpose although their shape is square (an ``nn.Linear(n, n)`` weight against
    an ``[in, out]`` layout: the shapes cannot tell). Raises ``ValueError`` naming the tensor
    when a layout tensor has no parameter, a shape is neither equal nor the reversed 2-D shape,
    or a trainable parameter of the module is not in the layout.
    """
    params = dict(module.named_parameters())
    rename = dict(rename or {})
    forced = set(transpose)
    unknown = forced - {name for name, _ in layout}
    if unknown:
        raise ValueError(f"transpose names {sorted(unknown)}, which the server's layout lacks")
    slots: List[Slot] = []
    used = set()
    offset = 0
    for name, shape in layout:
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        pname = rename.get(name, name)
        p = params.get(pname)
        if p is None:
            known = ", ".join(f"{n} {list(q.shape)}" for n, q in params.items()) or "none"
            raise ValueError(
                f"tensor {name!r} {list(shape)} of the server's layout has no parameter "
                f"{pname!r} in the module (its parameters: {known}); pass rename={{{name!r}: ...}}"
            )
        pshape = tuple(int(s) for s in p.shape)
        if len(shape) == 2 and pshape == shape[::-1] and (shape[0] != shape[1] or name in forced):
            flip = True
        elif pshape == shape and name not in forced:
            flip = False
        else:
            raise ValueError(
                f"tensor {name!r}: the server's layout has shape {list(shape)}, the module's "
                f"parameter {pname!r} has {list(pshape)} (neither equal nor transposed"
                + (", and transpose names it)" if name in forced else ")")
            )
        if pname in used:
            raise ValueError(f"tensor {name!r}: parameter {pname!r} is already mapped to another tensor")
        used.add(pname)
        slots.append(Slot(name, pname, p, shape, offset, numel, flip))
        offset += numel
    extra = [n for n, p in params.items() if n not in used and p.requires_grad]
    if extra:
        raise ValueError(
            f"parameter {extra[0]!r} {list(params[extra[0]].shape)} of the module is not in the "
            f"server's layout ({', '.join(n for n, _ in layout)}); freeze it (requires_grad=False) "
            f"or map it with rename"
        )
    return slots


def _num_params(slots: Sequence[Slot]) -> int:
    return sum(s.numel for s in slots)


def load_flat(slots: Sequence[Slot], flat: np.ndarray) -> None:
    """Copies a flat float32 vector (layout order) into the mapped parameters."""
    import torch

    flat = np.ascontiguousarray(flat, dtype=np.float32)
    if flat.shape != (_num_params(slots),):
        raise ValueError(f"expected {_num_params(slots)} values, got an array of shape {flat.shape}")
    with torch.no_grad():
        for s in slots:
            v = torch.from_numpy(flat[s.offset : s.offset + s.numel].copy()).reshape(s.shape)
            if s.transpose:
                v = v.t()
            s.param.copy_(v)  # converts to the parameter's dtype and device


def flatten(slots: Sequence[Slot]) -> np.ndarray:
    """The mapped parameters as one float32 vector in layout order."""
    import torch

    out = np.empty(_num_params(slots), dtype=np.float32)
    with torch.no_grad():
        for s in slots:
            t = s.param.detach()
            if s.transpose:
                t = t.t()
            t = t.to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
            out[s.offset : s.offset + s.numel] = t.numpy()
    return out


class TorchClient:
    """A module joined to a sparsync server.

    ``TorchClient(module, url, client_id, model="mlp", token=None, ...)``: the keyword
    arguments go to :class:`sparsync.Client` (``model`` defaults to ``"mlp"``); ``rename`` and
    ``transpose`` are :func:`map_parameters`'. On success the module holds the server's
    replica x̂; a module that does not match raises ``ValueError`` (and the session is closed).

    One round by hand::

        tc = TorchClient(model, "ws://127.0.0.1:7070/ws", "torch-1")
        lr = tc.directive.get("learning_rate", 0.05)
        ...train model locally (any optimizer)...
        tc.step(samples=320, loss=0.41)   # push the change, wait for the Ack, load the new x̂
    """

    def __init__(
        self,
        module: Any,
        url: str,
        client_id: str,
        *,
        rename: Optional[Mapping[str, str]] = None,
        transpose: Iterable[str] = (),
        **client_kwargs: Any,
    ):
        client_kwargs.setdefault("model", "mlp")
        self.module = module
        self.client = Client(url, client_id, **client_kwargs)
        self.bye: Optional[str] = None
        self._base: Optional[np.ndarray] = None
        self._base_version: Optional[int] = None
        try:
            self.slots = map_parameters(module, self.client.layout, rename, transpose)
            await_directive(self.client)
            self.load_replica()
        except BaseException:
            self.client.close("client setup failed")
            raise

    @property
    def directive(self) -> Dict[str, Any]:
        """What the server asks of this client (``local_steps``, ``batch_size``,
        ``learning_rate``, ``chunk_size``, ``local_epochs``, …): only the fields it set."""
        return dict(self.client.directive)

    @property
    def version(self) -> int:
        """The replica version the client holds."""
        return self.client.version

    @property
    def base_version(self) -> Optional[int]:
        """The replica version last loaded into the module (what the next push is relative to)."""
        return self._base_version

    def load_replica(self) -> int:
        """Copies x̂ into the module's parameters; later pushes are relative to it. Returns its
        version."""
        flat = self.client.replica()
        load_flat(self.slots, flat)
        self._base = np.asarray(flat, dtype=np.float32)
        self._base_version = self.client.version
        return self._base_version

    def delta(self) -> np.ndarray:
        """The module's change since the last :meth:`load_replica` (float32, layout order)."""
        assert self._base is not None
        return flatten(self.slots) - self._base

    def push_update(self, samples: int, loss: float, local_steps: int = 1, rho: Optional[float] = None) -> int:
        """Pushes the module's change since the last load (Top-k with error feedback); returns
        the seq. A loss that is not a finite number ≥ 0 is sent as 0."""
        return self.client.push(
            self.delta(), max(1, int(samples)), push_loss(loss), local_steps=max(0, int(local_steps)), rho=rho
        )

    def sync(self, timeout: float = 0.05) -> int:
        """Applies what arrived (Deltas, Snapshots) until nothing comes within ``timeout``;
        remembers a Bye in :attr:`bye`. Returns the replica version. Does not load it into the
        module (see :meth:`load_replica`)."""
        bye = drain(self.client, timeout)
        if bye is not None:
            self.bye = bye
        return self.client.version

    def step(
        self,
        samples: int,
        loss: float,
        local_steps: int = 1,
        rho: Optional[float] = None,
        timeout: float = 120.0,
    ) -> Dict[str, Any]:
        """One round: push the change, wait for its Ack, apply what arrived and load the new x̂
        into the module. Returns the Ack; raises :class:`sparsync.RejectedError` when refused
        (after loading x̂: the refused entries went back into the residual, so nothing is
        lost)."""
        seq = self.push_update(samples, loss, local_steps=local_steps, rho=rho)
        try:
            ack = self.client.wait_ack(seq, timeout)
        except RejectedError:
            self.sync()
            self.load_replica()
            raise
        self.sync()
        self.load_replica()
        return ack

    def close(self, reason: str = "done") -> None:
        self.client.close(reason)

    def __enter__(self) -> "TorchClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close("done" if exc[0] is None else "error")


def _wants_directive(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes the directive: a second required positional argument, one named
    ``directive``, or ``*args``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return (
        len(required) >= 2
        or any(p.name == "directive" for p in positional[1:2])
        or any(p.kind == p.VAR_POSITIONAL for p in params)
    )


def join_training(
    module: Any,
    url: str,
    client_id: str,
    train_round: Callable[..., Any],
    rounds: Optional[int] = None,
    seconds: Optional[float] = None,
    *,
    on_round: Optional[Callable[[Dict[str, Any]], Any]] = None,
    ack_timeout: float = 120.0,
    rename: Optional[Mapping[str, str]] = None,
    transpose: Iterable[str] = (),
    **client_kwargs: Any,
) -> Dict[str, Any]:
    """Trains ``module`` with the server until ``rounds`` rounds or ``seconds`` seconds have
    passed (both None: until the server says Bye or closes the connection).

    Each round: the module holds x̂; ``train_round(module)`` (or ``train_round(module,
    directive)`` when it takes two arguments; the directive is a dict with ``local_steps``,
    ``batch_size``, ``learning_rate`` when the server set them) trains locally and returns
    ``(samples, loss)`` or ``(samples, loss, local_steps)``; the change is pushed (Top-k with
    error feedback), its Ack awaited, the Deltas that arrived applied and x̂ loaded back.
    ``on_round(info)`` is then called with a dict (``round``, ``seq``, ``version``,
    ``staleness``, ``samples``, ``loss``, ``rejected``, ``elapsed``) while the module holds x̂.

    ``rename`` and ``transpose`` are :func:`map_parameters`'; ``ack_timeout`` bounds the wait
    for each Ack. Other keyword arguments go to :class:`sparsync.Client` (``model``, ``token``, ``role``,
    ``device``, ``ca``, ``timeout``, …). Returns a summary: ``rounds``, ``pushes``, ``acked``,
    ``rejected``, ``version`` (final replica version), ``stop`` (why it stopped),
    ``seconds``, ``last_loss``. The module ends holding the final x̂.
    """
    start = time.monotonic()
    tc = TorchClient(module, url, client_id, rename=rename, transpose=transpose, **client_kwargs)
    with_directive = _wants_directive(train_round)
    summary: Dict[str, Any] = {
        "rounds": 0,
        "pushes": 0,
        "acked": 0,
        "rejected": 0,
        "version": tc.version,
        "stop": "",
        "seconds": 0.0,
        "last_loss": None,
    }

    def make_update(round_: int) -> Update:
        directive = tc.directive
        out = train_round(module, directive) if with_directive else train_round(module)
        samples, loss = out[0], out[1]
        steps = out[2] if len(out) > 2 else directive.get("local_steps", 1)
        info: Dict[str, Any] = {"round": round_, "samples": int(samples), "loss": float(loss)}
        return tc.delta(), samples, loss, int(steps or 1), info

    def after_round(info: Dict[str, Any]) -> None:
        tc.load_replica()
        info["version"] = tc.version

    def on_bye(reason: str) -> None:
        tc.bye = reason

    return run_rounds(
        tc.client,
        make_update,
        summary,
        rounds=rounds,
        seconds=seconds,
        ack_timeout=ack_timeout,
        start=start,
        after_round=after_round,
        on_round=on_round,
        on_bye=on_bye,
        rate_pause=0.2,
    )
