"""A user's own PyTorch model: exported with ``export_init``, served with ``serve --init``,
joined with no ``model=`` argument, modules in half precision (and on CUDA when torch has it),
and the own-model example end to end.

torch is required: these tests fail (never skip) when it is missing; the CUDA test alone runs
only where torch has CUDA."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from sparsync import Client, SparsyncError
from sparsync._served import status_url
from sparsync.torch import TorchClient, export_init, flatten, join_training, load_safetensors, map_parameters


class OwnNet(nn.Module):
    """Not a built-in layout: a conv, a LayerNorm, a linear layer (square, to test that
    exported shapes map as they are), a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 5, stride=3)  # 28×28 → 8×8
        self.fc1 = nn.Linear(256, 16)
        self.norm = nn.LayerNorm(16)
        self.sq = nn.Linear(16, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x.reshape(-1, 1, 28, 28))).flatten(1)
        x = torch.relu(self.sq(self.norm(self.fc1(x))))
        return self.head(x)


OWN_LAYOUT = [
    ("conv.weight", (4, 1, 5, 5)),
    ("conv.bias", (4,)),
    ("fc1.weight", (16, 256)),
    ("fc1.bias", (16,)),
    ("norm.weight", (16,)),
    ("norm.bias", (16,)),
    ("sq.weight", (16, 16)),
    ("sq.bias", (16,)),
    ("head.weight", (10, 16)),
    ("head.bias", (10,)),
]


@pytest.fixture
def own(start_server, tmp_path):
    """(server, initial module): a server started with ``--init own.safetensors`` of a seeded
    OwnNet whose LayerNorm weights are not the default ones."""
    torch.manual_seed(7)
    m = OwnNet()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.1, 0.1)
    path = tmp_path / "own.safetensors"
    assert export_init(m, path) == OWN_LAYOUT
    return start_server(init=path), m


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def test_status_url_is_beside_the_websocket():
    assert status_url("ws://127.0.0.1:7070/ws") == "http://127.0.0.1:7070/api/status"
    assert status_url("wss://example.org/sparsync/ws") == "https://example.org/sparsync/api/status"
    assert status_url("WS://h:1") == "http://h:1/api/status"
    with pytest.raises(SparsyncError) as ei:
        status_url("http://127.0.0.1:7070/ws")
    assert ei.value.field == "url" and "ws://" in ei.value.reason


def test_a_client_takes_the_model_the_server_serves(own, clients):
    srv, _ = own
    c = clients(srv.ws, "own-plain")
    assert c.model == "own"
    assert c.layout == OWN_LAYOUT  # export order is the flat vector's order
    assert c.num_params == sum(int(np.prod(s)) for _, s in OWN_LAYOUT)
    # A given model is an assertion: the right one connects, another is refused naming both.
    assert clients(srv.ws, "own-named", model="own").model == "own"
    with pytest.raises(SparsyncError) as ei:
        Client(srv.ws, "own-wrong", model="mlp", timeout=10)
    assert ei.value.field == "model"
    assert '"mlp"' in ei.value.reason and '"own"' in ei.value.reason
    # No server: the status request fails as a connection error naming the address.
    with pytest.raises(SparsyncError) as ei:
        Client("ws://127.0.0.1:9/ws", "own-nowhere", timeout=5)
    assert ei.value.field == "connection" and "127.0.0.1:9/api/status" in ei.value.reason


def make_ca_and_cert(d) -> "tuple[str, str, str]":
    """(ca.pem, cert.pem, key.pem): a private CA and a certificate it signed for 127.0.0.1, made
    with the openssl command (as a user's private CA would be)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test CA (apt-get install openssl)")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sparsync test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("x509", "-req", "-in", "cert.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "cert.pem",
        "-days", "2", "-extfile", "ext.cnf")
    return str(d / "ca.pem"), str(d / "cert.pem"), str(d / "key.pem")


def test_over_tls_the_model_is_asked_with_the_callers_ca(sparsync_bin, tmp_path):
    ca, cert, key = make_ca_and_cert(tmp_path)
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [str(sparsync_bin), "serve", "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--engine", "cpu",
         "--tls-cert", cert, "--tls-key", key],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        ws = None
        while ws is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the TLS server did not start"
            text = ready.read_text().strip() if ready.exists() else ""
            if re.fullmatch(r"https://127\.0\.0\.1:\d+", text):
                try:
                    Client(text.replace("https", "wss") + "/ws", "tls-probe", ca=ca, timeout=5).close()
                    ws = text.replace("https", "wss") + "/ws"
                except SparsyncError:
                    time.sleep(0.1)
            else:
                time.sleep(0.05)
        c = Client(ws, "tls-1", ca=ca, timeout=10)
        assert c.model == "mlp"
        c.close()
        # Without the CA the status request is refused as the WebSocket would be.
        with pytest.raises(SparsyncError) as ei:
            Client(ws, "tls-2", timeout=10)
        assert ei.value.field == "certificate", (ei.value.field, ei.value.reason)
        assert "/api/status" in ei.value.reason
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_export_init_is_what_the_server_serves_and_loads_back(own, clients, tmp_path):
    srv, m = own
    # The server starts from the exported values exactly, in the module's own shapes.
    c = clients(srv.ws, "own-export")
    assert np.array_equal(c.replica(), np.concatenate([p.detach().reshape(-1).numpy() for p in m.parameters()]))
    raw = fetch(srv.http + "/api/model.safetensors")
    fresh = OwnNet()
    slots = load_safetensors(fresh, raw)
    assert [(s.name, s.transpose) for s in slots] == [(n, False) for n, _ in OWN_LAYOUT]  # square sq.weight too
    for (name, p), q in zip(m.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    # The file: a JSON header naming the order, the data in that order, F32.
    (n,) = struct.unpack("<Q", (tmp_path / "own.safetensors").read_bytes()[:8])
    header = json.loads((tmp_path / "own.safetensors").read_bytes()[8 : 8 + n])
    assert json.loads(header["__metadata__"]["sparsync.order"]) == [name for name, _ in OWN_LAYOUT]
    starts = [header[name]["data_offsets"][0] for name, _ in OWN_LAYOUT]
    assert starts == sorted(starts) and {header[name]["dtype"] for name, _ in OWN_LAYOUT} == {"F32"}
    # A frozen parameter is the user's, not the server's; a module without trainable ones is refused.
    m.norm.bias.requires_grad_(False)
    assert [name for name, _ in export_init(m, tmp_path / "frozen.safetensors")] == [
        name for name, _ in OWN_LAYOUT if name != "norm.bias"
    ]
    with pytest.raises(ValueError, match="no trainable parameters"):
        export_init(nn.ReLU(), tmp_path / "none.safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_safetensors(OwnNet(), b"\x10\x00\x00\x00\x00\x00\x00\x00{}")


def test_a_module_that_does_not_match_gets_one_error_listing_everything(own):
    srv, _ = own

    class Wrong(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 5, stride=3)
            self.fc1 = nn.Linear(256, 32)  # mis-shaped: [32, 256] against [16, 256]
            self.norm = nn.LayerNorm(16)
            self.sq = nn.Linear(16, 16)
            self.scale = nn.Parameter(torch.ones(3))  # extra
            # head.weight and head.bias missing

    with pytest.raises(ValueError) as ei:
        TorchClient(Wrong(), srv.ws, "own-wrong-module")
    msg = str(ei.value)
    assert "model 'own'" in msg
    assert re.search(r"mis-shaped: 'fc1\.weight' is \[16, 256\].*\[32, 256\]", msg), msg
    assert re.search(r"mis-shaped: 'fc1\.bias'", msg), msg
    assert re.search(r"missing from the module: 'head\.weight' \[10, 16\], 'head\.bias' \[10\]", msg), msg
    assert re.search(r"not in the layout: 'scale' \[3\]", msg), msg
    # Every problem is a line of its own, after the count.
    lines = [ln for ln in msg.splitlines() if ln.startswith("  - ")]
    assert len(lines) == 4, msg
    assert "(4 problems)" in msg
    # The refused client said Bye: its session ends (/api/status is republished every 100 ms).
    deadline = time.monotonic() + 10
    while "own-wrong-module" in [c["client_id"] for c in srv.status()["clients"]]:
        assert time.monotonic() < deadline, "the refused client's session stayed open"
        time.sleep(0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_read_and_write_the_f32_replica(own, dtype):
    srv, _ = own
    torch.manual_seed(3)
    m = OwnNet().to(dtype)
    with TorchClient(m, srv.ws, f"own-{str(dtype)[6:]}") as tc:
        x = tc.client.replica()
        # The module holds x̂ rounded to its dtype; read back, that is exactly the rounding.
        assert all(p.dtype == dtype for p in m.parameters())
        rounded = torch.from_numpy(x).to(dtype).to(torch.float32).numpy()
        assert np.array_equal(flatten(tc.slots), rounded)
        assert not np.array_equal(rounded, x)  # (the test means something: rounding happened)
        # Rounding is not a change: nothing to push before training.
        assert not np.any(tc.delta())
        # A change made in half precision comes back as exactly that change, in float32.
        with torch.no_grad():
            m.head.bias.add_(0.5)
        d = tc.delta()
        off = sum(int(np.prod(s)) for _, s in OWN_LAYOUT[:-1])
        want = (torch.from_numpy(rounded[off:]).to(dtype) + 0.5).to(torch.float32).numpy() - rounded[off:]
        assert np.array_equal(d[off:], want) and not np.any(d[:off])
        ack = tc.step(samples=10, loss=0.5)
        assert ack["type"] == "ack"
        assert np.array_equal(flatten(tc.slots), torch.from_numpy(tc.client.replica()).to(dtype).float().numpy())
        assert tc.version > 0 and not np.any(tc.delta())
    if dtype == torch.bfloat16:  # CPU PyTorch trains in bfloat16 (not float16) on every version
        x_, y_ = torch.rand(64, 784).to(dtype), torch.randint(0, 10, (64,))

        def train_round(module):
            loss = F.cross_entropy(module(x_).float(), y_)
            module.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in module.parameters():
                    p.sub_(0.1 * p.grad)
            return 64, loss.item()

        s = join_training(m, srv.ws, "own-bf16-train", train_round, rounds=3)
        assert (s["rounds"], s["acked"], s["rejected"]) == (3, 3, 0), s


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA here (the CPU dtype tests still ran)")
def test_a_cuda_module_is_read_and_written(own):
    srv, _ = own
    m = OwnNet().cuda()
    with TorchClient(m, srv.ws, "own-cuda") as tc:
        assert all(p.is_cuda for p in m.parameters())
        assert np.array_equal(flatten(tc.slots), tc.client.replica())
        with torch.no_grad():
            m.head.bias.add_(1.0)
        assert np.count_nonzero(tc.delta()) == 10
        assert tc.step(samples=10, loss=0.5)["type"] == "ack"
        assert all(p.is_cuda for p in m.parameters())
        assert np.array_equal(flatten(tc.slots), tc.client.replica())


def test_map_parameters_checks_renamed_and_frozen_parameters():
    layout = [("fc.weight", (3, 2)), ("fc.bias", (3,))]
    seq = nn.Sequential(nn.Linear(2, 3))
    slots = map_parameters(seq, layout, rename={"fc.weight": "0.weight", "fc.bias": "0.bias"})
    assert [s.param_name for s in slots] == ["0.weight", "0.bias"]
    with pytest.raises(ValueError) as ei:
        map_parameters(seq, layout, rename={"fc.weight": "0.weight", "fc.bias": "0.weight"}, transpose={"nope"})
    msg = str(ei.value)
    assert "transpose names ['nope']" in msg and "'fc.bias' is [3] in the layout" in msg
    assert "not in the layout: '0.bias' [3]" in msg


def test_the_own_model_example_trains_with_no_model_argument(sparsync_bin, tmp_path):
    script = REPO / "examples" / "pytorch_own_model.py"
    r = subprocess.run(
        [sys.executable, str(script), "--sparsync", str(sparsync_bin), "--engine", "cpu", "--rounds", "12",
         "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"exit {r.returncode}\n{out}\nserver log:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
    for i in (0, 1):
        assert f"own-{i}: reached 12 rounds; 12 rounds, 12 acked, 0 rejected" in out, out
    m = re.search(r"served model: version (\d+), test accuracy ([0-9.]+)", out)
    assert m, out
    assert int(m.group(1)) > 0
    # 24 rounds of 10 SGD steps from a random start: well above chance (0.1).
    assert float(m.group(2)) > 0.5, out
