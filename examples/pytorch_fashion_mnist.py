#!/usr/bin/env python3
"""Train the built-in `mlp` on Fashion-MNIST with PyTorch, synchronised by a sparsync server.

    ./target/release/sparsync serve --policy asp                      # terminal 1
    pip install ./clients/python torch                                # once
    python examples/pytorch_fashion_mnist.py --url ws://127.0.0.1:7070/ws --rounds 200

Data: --data DIR (the four IDX .gz files), else Debian's dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist) when installed, else the 4,000-image subset in
data/fashion-mnist-subset/. Each round trains as the server's directive says (local_steps SGD
steps of batch_size at learning_rate; flags override it) from the server's replica, then pushes
the change (Top-k with error feedback) and loads the new replica. Native and browser clients
can train beside it.
"""

import argparse
import gzip
import os
import struct
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsync.torch import join_training

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
SUBSET = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-subset"
FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed or not)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    return np.frombuffer(raw, np.uint8, count=int(np.prod(shape)), offset=4 + 4 * dims).reshape(shape)


def load(data: str = None):
    """(train images, train labels, test images, test labels, source) as tensors; pixels in [0, 1]."""
    if data:
        d = Path(data)
    else:
        d = DEBIAN if all((DEBIAN / f).is_file() for f in FILES) else SUBSET
    arrays = [read_idx(d / f) for f in FILES]
    x_train, x_test = (torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255.0) for a in arrays[0::2])
    y_train, y_test = (torch.from_numpy(a.astype(np.int64)) for a in arrays[1::2])
    return x_train, y_train, x_test, y_test, d


class MLP(nn.Module):
    """The server's `mlp`: 784 → 128 (relu) → 10; nn.Linear weights are the layout's transposed."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="ws://127.0.0.1:7070/ws", help="the server's WebSocket address")
    p.add_argument("--client-id", default=f"torch-{os.getpid()}")
    p.add_argument("--token", default=os.environ.get("SPARSYNC_TOKEN"), help="join token, if the server needs one")
    p.add_argument("--rounds", type=int, default=200, help="local rounds (pushes) to run")
    p.add_argument("--seconds", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--data", default=None, help="directory with the four Fashion-MNIST IDX files")
    p.add_argument("--shard", default="0/1", help="train on shard I of N (I/N) of the training set")
    p.add_argument("--local-steps", type=int, default=None, help="override the directive's local_steps")
    p.add_argument("--batch-size", type=int, default=None, help="override the directive's batch_size")
    p.add_argument("--lr", type=float, default=None, help="override the directive's learning_rate")
    p.add_argument("--eval-every", type=int, default=20, help="score the replica every N rounds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test, source = load(args.data)
    i, n = (int(v) for v in args.shard.split("/"))
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(args.seed))
    mine = order[i::n]
    x_train, y_train = x_train[mine], y_train[mine]
    print(f"data: {source} (shard {i}/{n}: {len(y_train)} training, {len(y_test)} test images)", flush=True)

    gen = torch.Generator().manual_seed(args.seed + 1)

    def train_round(model, directive):
        steps = args.local_steps or int(directive.get("local_steps", 10))
        batch = args.batch_size or int(directive.get("batch_size", 32))
        lr = args.lr or float(directive.get("learning_rate", 0.05))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(0, len(y_train), (batch,), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return steps * batch, total / max(steps, 1), steps

    model = MLP()

    def on_round(info):
        r = info["round"]
        if r == 1 or r % args.eval_every == 0 or r == args.rounds:
            acc = accuracy(model, x_test, y_test)  # the module holds the replica x̂ now
            note = f" rejected ({info['rejected']})" if info.get("rejected") else f" staleness {info.get('staleness')}"
            print(
                f"round {r:5d}  version {info['version']:6d}  train loss {info['loss']:.4f}  "
                f"test accuracy {acc:.4f}{note}  ({info['elapsed']:.1f} s)",
                flush=True,
            )

    summary = join_training(
        model, args.url, args.client_id, train_round, rounds=args.rounds, seconds=args.seconds,
        on_round=on_round, model="mlp", token=args.token, device=f"pytorch {torch.__version__}",
    )
    print(
        f"done: {summary['stop']}; {summary['rounds']} rounds, {summary['acked']} acked, "
        f"{summary['rejected']} rejected, version {summary['version']}, "
        f"test accuracy {accuracy(model, x_test, y_test):.4f}, {summary['seconds']:.1f} s",
        flush=True,
    )
    return 0 if summary["rounds"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
