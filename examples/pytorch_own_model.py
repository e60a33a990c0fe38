#!/usr/bin/env python3
"""Train a PyTorch model of your own with a sparsync server: export, serve, two trainers, score.

    pip install target/wheels/sparsync-*-abi3-*.whl    # or ./clients/python (needs Rust)
    python examples/pytorch_own_model.py --sparsync ./target/release/sparsync --rounds 100

The model is a small CNN with LayerNorm (not one of the server's built-ins). The script
  1. writes its initial parameters with `sparsync.torch.export_init` to WORKDIR/own.safetensors;
  2. starts `sparsync serve --init WORKDIR/own.safetensors` (which serves the model "own");
  3. runs --trainers processes (this script with --join), each training its shard of the
     Fashion-MNIST subset through `sparsync.torch.join_training` with no `model=` argument:
     the client takes the model the server serves and maps the module onto its layout;
  4. downloads the trained model from /api/model.safetensors, loads it into a fresh module with
     `sparsync.torch.load_safetensors` and prints its test accuracy.

With --url it joins a server already running instead (steps 3 and 4; start it with a file from
`--export-only FILE`). Data: as examples/pytorch_fashion_mnist.py (--data DIR, Debian's
dataset-fashion-mnist, else the 4,000-image subset in data/fashion-mnist-subset/).
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparsync.torch import export_init, join_training, load_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pytorch_fashion_mnist import accuracy, load  # noqa: E402  (the data loader, shared)


class OwnNet(nn.Module):
    """Conv 5×5 (8) → pool → conv 5×5 (16) → pool → linear 256→64 → LayerNorm → relu → linear
    64→10: 20,650 parameters, none of them a built-in layout."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(256, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.reshape(-1, 1, 28, 28)
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1)))))


def http_base(ws_url: str) -> str:
    """http://host:port/prefix of a ws://host:port/prefix/ws address."""
    return re.sub(r"^ws", "http", ws_url).rsplit("/", 1)[0]


def serve(sparsync: str, init: Path, workdir: Path, engine: str, policy: str) -> "tuple[subprocess.Popen, str]":
    """Starts `sparsync serve --init` on a free port; returns the process and its ws:// address."""
    ready = workdir / "server.ready"
    ready.unlink(missing_ok=True)
    log = open(workdir / "server.log", "wb")
    args = [sparsync, "serve", "--init", str(init), "--listen", "127.0.0.1:0", "--ready-file", str(ready),
            "--engine", engine, "--policy", policy]
    print("serving:", " ".join(args), flush=True)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        text = ready.read_text().strip() if ready.exists() else ""
        if re.fullmatch(r"http://[^\s/]+:\d+", text):
            try:  # the file is written in place: trust an address that answers
                urllib.request.urlopen(text + "/api/status", timeout=2).read()
                return proc, re.sub(r"^http", "ws", text) + "/ws"
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = (workdir / "server.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"the server did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.05)


def trainer(args) -> int:
    """One trainer process: join the server with a fresh OwnNet and train its shard."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, _, _, _ = load(args.data)
    i, n = (int(v) for v in args.shard.split("/"))
    mine = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(0))[i::n]
    x_train, y_train = x_train[mine], y_train[mine]
    gen = torch.Generator().manual_seed(args.seed)

    def train_round(model, directive):
        steps = args.local_steps or int(directive.get("local_steps", 10))
        batch = int(directive.get("batch_size", 32))
        opt = torch.optim.SGD(model.parameters(), lr=args.lr or float(directive.get("learning_rate", 0.05)))
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(0, len(y_train), (batch,), generator=gen)
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return steps * batch, total / steps, steps

    # No model= argument: the client takes the model the server serves ("own") and maps the
    # module onto its layout by name and shape (a ValueError lists any mismatch).
    summary = join_training(OwnNet(), args.join, args.client_id, train_round, rounds=args.rounds,
                            token=args.token, device=f"pytorch {torch.__version__}")
    print(f"{args.client_id}: {summary['stop']}; {summary['rounds']} rounds, {summary['acked']} acked, "
          f"{summary['rejected']} rejected, last loss {summary['last_loss']:.4f}", flush=True)
    return 0 if summary["acked"] > 0 else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsync", default=shutil.which("sparsync") or "target/release/sparsync",
                   help="the server binary to start (default: sparsync on PATH, else target/release/sparsync)")
    p.add_argument("--url", default=None, help="join this server (serving OwnNet) instead of starting one")
    p.add_argument("--token", default=os.environ.get("SPARSYNC_TOKEN"), help="join token, if the server needs one")
    p.add_argument("--export-only", metavar="FILE", default=None, help="write the initial model to FILE and stop")
    p.add_argument("--workdir", default=None, help="where own.safetensors and server.log go (default: a temporary directory)")
    p.add_argument("--engine", default="auto", help="the server's --engine (auto, gpu, cpu)")
    p.add_argument("--policy", default="asp", help="the server's --policy")
    p.add_argument("--trainers", type=int, default=2, help="trainer processes to run")
    p.add_argument("--rounds", type=int, default=100, help="rounds (pushes) per trainer")
    p.add_argument("--local-steps", type=int, default=None, help="override the directive's local_steps")
    p.add_argument("--lr", type=float, default=None, help="override the directive's learning_rate")
    p.add_argument("--data", default=None, help="directory with the four Fashion-MNIST IDX files")
    p.add_argument("--seed", type=int, default=0)
    # One trainer (what main starts --trainers of).
    p.add_argument("--join", default=None, help=argparse.SUPPRESS)
    p.add_argument("--client-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.join:
        return trainer(args)

    torch.manual_seed(args.seed)
    if args.export_only:
        layout = export_init(OwnNet(), args.export_only)
        print(f"wrote {args.export_only}: {', '.join(f'{n} {list(s)}' for n, s in layout)}")
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sparsync-own-"))
    workdir.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        if args.url:
            url = args.url
        else:
            init = workdir / "own.safetensors"  # the file's stem is the model's name: "own"
            layout = export_init(OwnNet(), init)
            print(f"exported {init}: {', '.join(f'{n} {list(s)}' for n, s in layout)}", flush=True)
            server, url = serve(args.sparsync, init, workdir, args.engine, args.policy)

        threads = max(1, (os.cpu_count() or 1) // args.trainers)
        started = time.monotonic()
        procs = [
            subprocess.Popen([sys.executable, __file__, "--join", url, "--client-id", f"own-{i}",
                              "--shard", f"{i}/{args.trainers}", "--rounds", str(args.rounds),
                              "--seed", str(args.seed + 1 + i), "--threads", str(threads)]
                             + (["--data", args.data] if args.data else [])
                             + (["--token", args.token] if args.token else [])
                             + (["--local-steps", str(args.local_steps)] if args.local_steps else [])
                             + (["--lr", str(args.lr)] if args.lr else []))
            for i in range(args.trainers)
        ]
        codes = [proc.wait() for proc in procs]
        print(f"trainers done in {time.monotonic() - started:.1f} s (exit codes {codes})", flush=True)

        # Score what the server holds now: x̂ as a safetensors file.
        req = urllib.request.Request(http_base(url) + "/api/model.safetensors")
        if args.token:
            req.add_header("Authorization", f"Bearer {args.token}")
        with urllib.request.urlopen(req, timeout=60) as r:
            served, version = r.read(), r.headers.get("x-sparsync-version")
        model = OwnNet()
        load_safetensors(model, served)  # matched by name and shape, as the trainers' modules
        _, _, x_test, y_test, source = load(args.data)
        print(f"served model: version {version}, test accuracy {accuracy(model, x_test, y_test):.4f} "
              f"({len(y_test)} test images of {source})", flush=True)
        return 0 if all(c == 0 for c in codes) else 1
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
