"""The Flask test app under a real ``gunicorn --preload -w 2``: the app and its NearCache
are made in the master before the fork, and each worker reconnects on its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RedisServer, free_port, wait_until

pytest.importorskip("flask", reason="the flask extra is not installed")
pytest.importorskip("gunicorn", reason="gunicorn is not installed")

ROOT = Path(__file__).resolve().parent.parent


def fetch(port: int, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "PUT",
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310 - http, loopback
        return json.loads(reply.read())


def test_flask_under_gunicorn_preload(
    redis_server: RedisServer, channel: str, tmp_path: Path
) -> None:
    """Both workers serve from their own subscribed cache (distinct instance ids), and a
    price changed through one worker is served by both within the staleness bound."""
    source = tmp_path / "prices.json"
    source.write_text(json.dumps({"1": 100}))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NEARCACHE_TEST_CONNECTION": redis_server.url,
        "NEARCACHE_TEST_CHANNEL": channel,
        "NEARCACHE_TEST_SOURCE": str(source),
    }
    command = [sys.executable, "-m", "gunicorn", "--preload", "-w", "2"]
    command += ["-b", f"127.0.0.1:{port}", "tests.apps.flask_app:create_app()"]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        workers: dict[int, str] = {}

        def both_workers_connected() -> bool:
            try:
                stats = fetch(port, "/stats")
            except OSError:
                return False  # not listening yet
            if stats["backplane"] == "connected":
                workers[stats["pid"]] = stats["instance"]
            return len(workers) == 2

        wait_until(both_workers_connected, 30, message="two connected workers")
        assert len(set(workers.values())) == 2
        assert proc.pid not in workers

        def served(price: int, pids: set[int]) -> bool:
            reply = fetch(port, "/products/1")
            if reply["product"]["price"] == price:
                pids.add(reply["pid"])
            return pids == set(workers)

        warm: set[int] = set()
        wait_until(lambda: served(100, warm), 20, message="both workers cached the price")
        flushed = fetch(port, "/products/1", {"price": 120})["flushed_at"]
        fresh: set[int] = set()
        deadline = flushed + 2.0  # the app's max_staleness
        while fresh != set(workers):
            started = time.monotonic()
            reply = fetch(port, "/products/1")
            if reply["product"]["price"] == 120:
                fresh.add(reply["pid"])
            else:
                assert started <= deadline, f"worker {reply['pid']} still serves the old price"
            assert started < flushed + 30, "a worker never served the new price"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
