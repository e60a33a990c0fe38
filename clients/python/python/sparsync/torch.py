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

A model of your own: :func:`export_init` writes its initial parameters to the file that
``sparsync serve --init own.safetensors`` serves (as model ``"own"``); trainers then join with
no ``model=`` (the client takes the model the server serves)::

    export_init(MyNet(), "own.safetensors")        # then: sparsync serve --init own.safetensors
    join_training(MyNet(), "ws://127.0.0.1:7070/ws", "torch-1", train_round, rounds=100)

Modules on a GPU or in float16/bfloat16 work as they are: x̂ (float32) is copied in converted,
and their change is read back widened to float32.

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

__all__ = [
    "BUILTIN_LAYOUTS",
    "Slot",
    "TorchClient",
    "export_init",
    "join_training",
    "load_safetensors",
    "map_parameters",
    "trainable_layout",
]

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
    """Matches ``module``'s parameters to ``layout`` (a ``Client.layout``, an entry of
    :data:`BUILTIN_LAYOUTS`, or what :func:`export_init` returned), tensor by tensor, in layout
    order.

    ``rename`` maps a layout name to the module's parameter name where they differ (e.g.
    ``{"fc1.weight": "0.weight"}`` for an ``nn.Sequential``). ``transpose`` names layout
    tensors to transpose although their shape is square (an ``nn.Linear(n, n)`` weight against
    an ``[in, out]`` layout: the shapes cannot tell). When the module does not match, raises one
    ``ValueError`` listing every problem: layout tensors the module lacks, tensors whose shape
    is neither equal nor the reversed 2-D shape, and trainable parameters the layout lacks.
    """
    params = dict(module.named_parameters())
    rename = dict(rename or {})
    forced = set(transpose)
    problems: List[str] = []
    unknown = forced - {name for name, _ in layout}
    if unknown:
        problems.append(f"transpose names {sorted(unknown)}, which the layout lacks")
    slots: List[Slot] = []
    missing: List[str] = []
    used: Dict[str, str] = {}
    claimed = set()  # parameters the layout names, matched or not
    offset = 0
    for name, shape in layout:
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        pname = rename.get(name, name)
        p = params.get(pname)
        if p is None:
            via = f" (renamed to {pname!r})" if pname != name else ""
            missing.append(f"{name!r} {list(shape)}{via}")
        else:
            claimed.add(pname)
            pshape = tuple(int(s) for s in p.shape)
            flip = None
            if len(shape) == 2 and pshape == shape[::-1] and (shape[0] != shape[1] or name in forced):
                flip = True
            elif pshape == shape and name not in forced:
                flip = False
            if flip is None:
                how = "neither equal nor transposed" + (", and transpose names it" if name in forced else "")
                problems.append(
                    f"mis-shaped: {name!r} is {list(shape)} in the layout, the module's {pname!r} is "
                    f"{list(pshape)} ({how})"
                )
            elif pname in used:
                problems.append(f"{name!r} and {used[pname]!r} both map to the module's {pname!r}")
            else:
                used[pname] = name
                slots.append(Slot(name, pname, p, shape, offset, numel, flip))
        offset += numel
    if missing:
        problems.append(f"missing from the module: {', '.join(missing)} (pass rename={{layout name: parameter name}})")
    extra = [n for n, p in params.items() if p.requires_grad and n not in claimed]
    if extra:
        problems.append(
            "not in the layout: "
            + ", ".join(f"{n!r} {list(params[n].shape)}" for n in extra)
            + " (trainable; freeze with requires_grad_(False), or map with rename)"
        )
    if problems:
        ours = ", ".join(f"{n} {list(p.shape)}" for n, p in params.items()) or "none"
        theirs = ", ".join(f"{n} {list(s)}" for n, s in layout) or "none"
        raise ValueError(
            f"the module does not match the server's layout ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n  - "
            + "\n  - ".join(problems)
            + f"\nlayout: {theirs}\nmodule: {ours}"
        )
    return slots


def _num_params(slots: Sequence[Slot]) -> int:
    return sum(s.numel for s in slots)


def load_flat(slots: Sequence[Slot], flat: np.ndarray) -> None:
    """Copies a flat float32 vector (layout order) into the mapped parameters, whatever their
    device and dtype: each tensor is converted from float32 (float16 and bfloat16 round to
    nearest) and copied to the parameter's device."""
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
    """The mapped parameters as one float32 vector in layout order (copied to the CPU and
    widened to float32, which holds every float16 and bfloat16 value exactly)."""
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


def trainable_layout(module: Any) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of each trainable parameter of ``module``, in ``named_parameters()``
    order: the layout :func:`export_init` writes."""
    return [(n, tuple(int(d) for d in p.shape)) for n, p in module.named_parameters() if p.requires_grad]


def export_init(module: Any, path: Any) -> List[Tuple[str, Tuple[int, ...]]]:
    """Writes ``module``'s trainable parameters to ``path`` as the safetensors file that
    ``sparsync serve --init PATH`` serves, and returns its layout.

    Each parameter is one float32 tensor under its own name and shape (an ``nn.Linear``
    weight stays ``[out, in]``), in ``named_parameters()`` order, which becomes the order of
    the server's flat vector (recorded under the metadata key ``sparsync.order``). Buffers
    (BatchNorm's running statistics) and frozen parameters are not written: the server does
    not train them. The model's name is the file's stem (``own.safetensors`` serves ``"own"``).
    Parameters on any device and in any floating dtype are copied to the CPU as float32.
    """
    import torch

    from . import _safetensors

    tensors = []
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if not p.is_floating_point():
                raise ValueError(f"parameter {name!r} is {p.dtype}; the server trains floating-point tensors")
            tensors.append((name, p.detach().to(device="cpu", dtype=torch.float32).numpy()))
    if not tensors:
        raise ValueError("the module has no trainable parameters to export")
    _safetensors.write(path, tensors)
    return [(n, tuple(a.shape)) for n, a in tensors]


def load_safetensors(
    module: Any,
    source: Any,
    rename: Optional[Mapping[str, str]] = None,
    transpose: Iterable[str] = (),
) -> List[Slot]:
    """Loads a sparsync model file into ``module``: ``source`` is a path or the file's bytes
    (e.g. ``GET /api/model.safetensors``, the server's current x̂, or an ``export_init`` file).
    Parameters are matched as :func:`map_parameters` does (``ValueError`` listing every
    mismatch); returns the slots."""
    from . import _safetensors

    if isinstance(source, (bytes, bytearray, memoryview)):
        tensors = _safetensors.decode(bytes(source))
    else:
        tensors = _safetensors.read(source)
    slots = map_parameters(module, [(n, a.shape) for n, a in tensors], rename, transpose)
    flat = np.concatenate([a.reshape(-1) for _, a in tensors]) if tensors else np.empty(0, np.float32)
    load_flat(slots, flat)
    return slots


class TorchClient:
    """A module joined to a sparsync server.

    ``TorchClient(module, url, client_id, model=None, token=None, ...)``: the keyword
    arguments go to :class:`sparsync.Client` (``model=None`` takes the model the server
    serves; a name asserts it); ``rename`` and ``transpose`` are :func:`map_parameters`'. On
    success the module holds the server's replica x̂; a module that does not match the
    server's layout raises one ``ValueError`` listing every mismatch (and the session is
    closed). The module may live on any device and in any floating dtype: x̂ is copied into it
    converted, and what is pushed is its change in its own precision (see :meth:`delta`).

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
        self.module = module
        self.client = Client(url, client_id, **client_kwargs)
        self.bye: Optional[str] = None
        self._base: Optional[np.ndarray] = None
        self._base_version: Optional[int] = None
        try:
            try:
                self.slots = map_parameters(module, self.client.layout, rename, transpose)
            except ValueError as e:
                raise ValueError(f"model {self.client.model!r} served at {url}: {e}") from None
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
        load_flat(self.slots, self.client.replica())
        # What the module holds now: x̂ itself, or x̂ rounded to the module's dtype (float16,
        # bfloat16). The change is measured from it, so rounding is never pushed as an update.
        self._base = flatten(self.slots)
        self._base_version = self.client.version
        return self._base_version

    def delta(self) -> np.ndarray:
        """The module's change since the last :meth:`load_replica` (float32, layout order),
        measured from the loaded x̂ as the module holds it (rounded to its dtype)."""
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
    for each Ack. Other keyword arguments go to :class:`sparsync.Client` (``model``: None, the
    default, takes the model the server serves; ``token``, ``role``,
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
