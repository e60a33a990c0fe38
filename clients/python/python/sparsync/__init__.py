"""Python client of the sparsync parameter server.

The protocol, the replica x̂ (Deltas and Snapshots applied bit for bit as the server computes
it) and Top-k with error feedback run in Rust (``sparsync._native``), from the same code as
the server; network waits release the GIL. A training loop::

    import numpy as np
    from sparsync import Client

    c = Client("ws://127.0.0.1:7070/ws", "py-1")   # the model the server serves (model="mlp" asserts it)
    for _ in range(100):
        x = c.replica()                       # float32, flat, in c.layout's order
        x_local = my_local_training(x)        # your training (e.g. directive's local_steps of SGD)
        seq = c.push(x_local - x, samples=320, loss=0.42)   # Top-k + error feedback in Rust
        c.wait_ack(seq)                       # raises RejectedError if refused (nothing is lost)
        c.sync()                              # apply the Deltas that arrived
    c.close()

``sparsync.torch`` maps a ``torch.nn.Module`` onto the server's layout (``TorchClient``,
``join_training``); ``sparsync.flower`` runs a Flower-style ``NumPyClient``.
"""

from ._native import Client, RejectedError, SparsyncError


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover (Python < 3.8)
        return "0.1.0"
    try:
        return version("sparsync")
    except PackageNotFoundError:
        return "0.1.0"


__version__ = _version()

__all__ = ["Client", "SparsyncError", "RejectedError", "__version__"]
