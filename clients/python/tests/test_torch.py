"""The PyTorch helper, the Flower-style adapter and the example, against a real server.

torch is required: these tests fail (never skip) when it is missing."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import MLP_LAYOUT, MLP_PARAMS, REPO, fnv1a64
from sparsync.flower import NumPyClient, start_numpy_client
from sparsync.torch import BUILTIN_LAYOUTS, TorchClient, flatten, join_training, map_parameters


class MLP(nn.Module):
    """The server's mlp in PyTorch."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def split(flat: np.ndarray, layout=MLP_LAYOUT) -> dict:
    """The flat vector as named arrays in layout shapes."""
    out, off = {}, 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = flat[off : off + n].reshape(shape)
        off += n
    assert off == flat.size
    return out


def accepted_by(server, client_id: str) -> int:
    events = server.record()
    sessions = {e["session"] for e in events if e["event"] == "join" and e["client_id"] == client_id}
    return sum(1 for e in events if e["event"] == "accept" and e["session"] in sessions)


def random_round(x, y, steps=None, batch=None):
    """A train_round: plain SGD on (x, y) as the directive says."""

    def train_round(module, directive):
        n_steps = steps or int(directive.get("local_steps", 10))
        b = batch or int(directive.get("batch_size", 32))
        opt = torch.optim.SGD(module.parameters(), lr=float(directive.get("learning_rate", 0.05)))
        total = 0.0
        for _ in range(n_steps):
            idx = torch.randint(0, len(y), (b,))
            loss = F.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        return n_steps * b, total / n_steps

    return train_round


def test_load_replica_puts_the_servers_model_into_the_module(server):
    torch.manual_seed(0)
    m = MLP()
    with TorchClient(m, server.ws, "torch-load") as tc:
        x = tc.client.replica()
        t = split(x)
        # nn.Linear's weight is the layout's [in, out] transposed.
        assert torch.equal(m.fc1.weight.detach(), torch.from_numpy(t["fc1.weight"].T.copy()))
        assert torch.equal(m.fc1.bias.detach(), torch.from_numpy(t["fc1.bias"].copy()))
        assert torch.equal(m.fc2.weight.detach(), torch.from_numpy(t["fc2.weight"].T.copy()))
        assert torch.equal(m.fc2.bias.detach(), torch.from_numpy(t["fc2.bias"].copy()))
        assert np.array_equal(flatten(tc.slots), x)
        assert not np.any(tc.delta())
        assert [(s.name, s.transpose) for s in tc.slots] == [
            ("fc1.weight", True), ("fc1.bias", False), ("fc2.weight", True), ("fc2.bias", False)
        ]
        assert tc.directive.get("local_steps") == 10
        assert math.isclose(tc.directive.get("learning_rate"), 0.05)
        # The module computes what the layout means: relu(x W1 + b1) W2 + b2.
        inp = torch.rand(4, 784)
        ref = np.maximum(inp.numpy() @ t["fc1.weight"] + t["fc1.bias"], 0) @ t["fc2.weight"] + t["fc2.bias"]
        assert np.allclose(m(inp).detach().numpy(), ref, atol=1e-5)
        fnv = fnv1a64(flatten(tc.slots))
        assert fnv == tc.client.checksum() == server.replica()["checksum"]

    # A float64 module gets the same values, converted.
    m64 = MLP().double()
    with TorchClient(m64, server.ws, "torch-load-64") as tc:
        assert m64.fc1.weight.dtype == torch.float64
        assert np.array_equal(flatten(tc.slots), tc.client.replica())
        assert not np.any(tc.delta())


def test_sgd_rounds_are_acked_and_the_module_follows_the_server(server):
    torch.manual_seed(1)
    m = MLP()
    x, y = torch.rand(256, 784), torch.randint(0, 10, (256,))
    train_round = random_round(x, y)
    with TorchClient(m, server.ws, "torch-sgd") as tc:
        for _ in range(5):
            samples, loss = train_round(m, tc.directive)
            d = tc.delta()
            assert d.dtype == np.float32 and d.shape == (MLP_PARAMS,)
            assert np.count_nonzero(d) > 1000
            ack = tc.step(samples, loss, local_steps=10)
            assert ack["type"] == "ack" and ack["staleness"] >= 0
            # step() loaded the new x̂ into the module.
            assert np.array_equal(flatten(tc.slots), tc.client.replica())
            assert tc.base_version == tc.version
        server.assert_same_replica(tc.client)
        tc.load_replica()
        assert np.array_equal(flatten(tc.slots), tc.client.replica())
    assert accepted_by(server, "torch-sgd") == 5


def test_join_training_runs_rounds_and_returns_a_summary(server):
    torch.manual_seed(2)
    x, y = torch.rand(256, 784), torch.randint(0, 10, (256,))
    infos = []
    m = MLP()
    summary = join_training(m, server.ws, "torch-join", random_round(x, y), rounds=4, on_round=infos.append)
    assert (summary["rounds"], summary["pushes"], summary["acked"], summary["rejected"]) == (4, 4, 4, 0), summary
    assert summary["stop"] == "reached 4 rounds"
    assert summary["last_loss"] is not None and summary["last_loss"] > 0
    assert [i["round"] for i in infos] == [1, 2, 3, 4]
    assert all(i["rejected"] is None and i["samples"] == 320 for i in infos)
    assert accepted_by(server, "torch-join") == 4
    assert summary["version"] <= server.replica()["version"]

    # A one-argument train_round, and a time limit.
    calls = []

    def one_arg(module):
        calls.append(1)
        with torch.no_grad():
            module.fc2.bias.add_(0.001)
        return 10, 0.5

    summary = join_training(MLP(), server.ws, "torch-join-2", one_arg, seconds=1.0)
    assert summary["stop"].startswith("ran for") and summary["rounds"] == len(calls) >= 1, summary
    assert summary["acked"] == summary["rounds"]


class TinyFlower(NumPyClient):
    def __init__(self, shapes=None):
        self.shapes = shapes
        self.fits = []
        self.evals = 0
        self.rng = np.random.default_rng(0)

    def get_parameters(self, config):
        return [np.zeros(s, dtype=np.float32) for s in self.shapes] if self.shapes else []

    def fit(self, parameters, config):
        self.fits.append(([p.shape for p in parameters], dict(config), [p.copy() for p in parameters]))
        new = [p + (1e-2 * self.rng.standard_normal(p.shape)).astype(np.float32) for p in parameters]
        for p in parameters:
            p[...] = 0  # the client may scribble on what it was given
        return new, 32, {"loss": 0.5}

    def evaluate(self, parameters, config):
        self.evals += 1
        return 0.25, 10, {"accuracy": 0.5}


def test_flower_adapter_runs_rounds(server):
    client = TinyFlower()
    summary = start_numpy_client(server.ws, client, "flower-1", rounds=3, evaluate_every=1)
    assert (summary["rounds"], summary["pushes"], summary["acked"], summary["rejected"]) == (3, 3, 3, 0), summary
    assert len(client.fits) == 3 and client.evals == 3
    assert all(shapes == [s for _, s in MLP_LAYOUT] for shapes, _, _ in client.fits)
    assert [c["server_round"] for _, c, _ in client.fits] == [1, 2, 3]
    assert all(math.isclose(c["learning_rate"], 0.05) and c["local_steps"] == 10 for _, c, _ in client.fits)
    assert [e[2] for e in summary["evaluations"]] == [0.25] * 3
    assert accepted_by(server, "flower-1") == 3
    # The first fit got the server's initial x̂ (the server has moved on since).
    first = np.concatenate([p.reshape(-1) for p in client.fits[0][2]])
    assert first.shape == (MLP_PARAMS,)
    assert np.all(first[784 * 128 : 784 * 128 + 128] == 0) and np.any(first[: 784 * 128] != 0)


def test_flower_adapter_follows_the_clients_orientation(start_server):
    srv = start_server()
    r0 = srv.replica()
    torch_shapes = [(128, 784), (128,), (10, 128), (10,)]
    client = TinyFlower(shapes=torch_shapes)
    summary = start_numpy_client(srv.ws, client, "flower-t", rounds=1)
    assert summary["acked"] == 1, summary
    shapes, _, given = client.fits[0]
    assert shapes == torch_shapes
    # Transposed back to the layout, the first parameters are the server's x̂ before any push.
    flat = np.concatenate([(p.T if p.ndim == 2 else p).reshape(-1) for p in given])
    assert fnv1a64(flat) == r0["checksum"]

    class Bad(TinyFlower):
        def fit(self, parameters, config):
            return parameters[:3], 32, {"loss": 0.5}

    with pytest.raises(ValueError, match="3 arrays"):
        start_numpy_client(srv.ws, Bad(), "flower-bad", rounds=1)
    with pytest.raises(ValueError, match="fc1.weight"):
        start_numpy_client(srv.ws, TinyFlower(shapes=[(784, 64), (128,), (128, 10), (10,)]), "flower-bad-2", rounds=1)


def test_a_module_that_does_not_match_is_refused_naming_the_tensor(server):
    mlp = BUILTIN_LAYOUTS["mlp"]
    with pytest.raises(ValueError, match="fc1.weight"):
        map_parameters(MLP(hidden=64), mlp)
    with pytest.raises(ValueError, match="fc1.weight"):
        TorchClient(MLP(hidden=64), server.ws, "torch-wrong")
    # The refused client left: its session ends.
    deadline = time.monotonic() + 10
    while "torch-wrong" in [c["client_id"] for c in server.status()["clients"]]:
        assert time.monotonic() < deadline, "the refused client's session stayed open"
        time.sleep(0.05)

    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 128)

    with pytest.raises(ValueError, match="fc2.weight"):
        map_parameters(Half(), mlp)
    extra = MLP()
    extra.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="scale"):
        map_parameters(extra, mlp)
    extra.scale.requires_grad_(False)  # frozen parameters outside the layout are allowed
    map_parameters(extra, mlp)

    # Other names through rename; conv weights map as they are, linear ones transposed.
    seq = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    names = {"fc1.weight": "0.weight", "fc1.bias": "0.bias", "fc2.weight": "2.weight", "fc2.bias": "2.bias"}
    slots = map_parameters(seq, mlp, rename=names)
    assert [s.transpose for s in slots] == [True, False, True, False]
    assert [s.offset for s in slots] == [0, 100352, 100480, 101760]

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 5)
            self.conv2 = nn.Conv2d(8, 16, 5)
            self.fc = nn.Linear(256, 10)

    slots = map_parameters(CNN(), BUILTIN_LAYOUTS["cnn"])
    assert [s.transpose for s in slots] == [False, False, False, False, True, False]
    assert sum(s.numel for s in slots) == 8 * 25 + 8 + 16 * 8 * 25 + 16 + 2560 + 10
    slots = map_parameters(nn.Sequential(), [])  # an empty module and layout: nothing to map
    assert slots == []

    # A square weight: the shapes cannot tell, so it maps as is unless transpose names it.
    square = nn.Sequential()
    square.fc = nn.Linear(4, 4, bias=False)
    layout = [("fc.weight", (4, 4))]
    assert [s.transpose for s in map_parameters(square, layout)] == [False]
    assert [s.transpose for s in map_parameters(square, layout, transpose={"fc.weight"})] == [True]
    with pytest.raises(ValueError, match="fc.bias"):
        map_parameters(square, layout, transpose={"fc.bias"})


def test_the_example_trains_against_a_server(server):
    script = REPO / "examples" / "pytorch_fashion_mnist.py"
    r = subprocess.run(
        [sys.executable, str(script), "--url", server.ws, "--rounds", "5", "--eval-every", "2", "--client-id", "example-1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert "done: reached 5 rounds; 5 rounds, 5 acked, 0 rejected" in r.stdout, r.stdout
    assert accepted_by(server, "example-1") == 5
