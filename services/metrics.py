"""Prometheus `/metrics` and `/healthz` for processes that are not web apps (learner, generators).

Names follow `orz_<process>_<what>_<unit>` (docs/architecture.md, "Metrics"). Each process owns a
`CollectorRegistry` and passes it around; nothing registers into a module-global default.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def wait_healthy(base_url: str, timeout_s: float, proc: subprocess.Popen | None = None,
                 what: str = "the server") -> None:
    """Polls `base_url`/healthz until it answers 200; raises if `proc` exits or `timeout_s` passes first."""
    deadline = time.time() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{what} did not start in {timeout_s:.0f} s")
        time.sleep(0.2)


def window_steps(n_steps: int, window: int = 10) -> int:
    """Steps in each of the first/last windows a run's summary compares: `window`, or half a short run."""
    return max(1, min(window, n_steps // 2))


def window_means(history: list[dict], key: str, window: int = 10) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window_steps` records (`orz up`'s summary and its plot)."""
    k = window_steps(len(history), window)
    values = [r[key] for r in history]
    return sum(values[:k]) / k, sum(values[-k:]) / k


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MetricsServer:
    """Serves the registry on `/metrics` and `health()` as JSON on `/healthz`, from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1",
                 health: Callable[[], dict] | None = None) -> None:
        self.registry = registry
        health_fn = health or (lambda: {"status": "ok"})

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?")[0] == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path.split("?")[0] == "/healthz":
                    body, ctype, code = json.dumps(health_fn()).encode(), "application/json", 200
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
