"""What a server serves, asked over HTTP before the WebSocket Hello: ``Client(..., model=None)``
names the model from ``GET /api/status`` (an open endpoint, as the browser client does), so a
user's own model (``serve --init own.safetensors`` serves ``"own"``) needs no ``model=``."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

from ._native import SparsyncError


def status_url(ws_url: str) -> str:
    """The ``/api/status`` address beside a WebSocket address: the scheme's HTTP twin and the
    last path segment (``ws``) replaced, so a server behind a path prefix is found too::

        ws://127.0.0.1:7070/ws         -> http://127.0.0.1:7070/api/status
        wss://example.org/sparsync/ws  -> https://example.org/sparsync/api/status
    """
    u = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(u.scheme.lower())
    if scheme is None or not u.netloc:
        raise _error("url", f"{ws_url!r} is not a ws:// or wss:// address")
    base = u.path.rsplit("/", 1)[0] if "/" in u.path else ""
    return urllib.parse.urlunsplit((scheme, u.netloc, base + "/api/status", "", ""))


def served_model(ws_url: str, ca: Optional[str] = None, timeout: float = 30.0) -> str:
    """The name of the model the server at ``ws_url`` serves. Raises :class:`SparsyncError`
    (``field`` ``"connection"``, ``"certificate"`` or ``"model"``) naming the address asked."""
    url = status_url(ws_url)
    context = None
    if url.startswith("https:"):
        try:
            context = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as e:
            raise _error("certificate", f"{ca}: {e}") from None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            status = json.loads(r.read().decode("utf-8"))
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and bad JSON
        cause = getattr(e, "reason", e)
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise _error("certificate", f"{url}: {cause.verify_message or cause}") from None
        raise _error(
            "connection",
            f"asking {url} which model the server serves (model=None): {cause}; "
            f"pass model=NAME to skip this",
        ) from None
    model = status.get("model") if isinstance(status, dict) else None
    if not isinstance(model, str) or not model:
        raise _error("model", f"{url} names no model; pass model=NAME")
    return model


def _error(field: str, reason: str) -> SparsyncError:
    e = SparsyncError(f"{field}: {reason}")
    e.field = field
    e.reason = reason
    return e
