"""One test app in its own process, driven over JSON lines through its framework's test client.

``python -m tests.apps.host django|flask|fastapi --connection URL --channel NAME --source PATH``.
A request ``{"op": "http", "method": M, "path": P, "json": BODY}`` is sent through the test
client (Django's ``Client``, Flask's ``test_client()``, Starlette's ``TestClient`` with the
lifespan running); the reply is ``{"ok": {"status": CODE, "body": JSON}}``. ``seed`` creates a
Django product, ``exit`` ends the process. With ``--fork`` the app is made first and the
process then forks, as ``gunicorn --preload`` does: the child serves the file descriptors
``--child-in`` / ``--child-out``.

Every app answers the same paths: ``/items/<key>`` (GET, PUT ``{"value"}``, DELETE),
``/batch/set`` ``{"items"}``, ``/batch/delete`` ``{"keys"}``, ``/clear``, ``/products/<id>``
(GET through the cache, PUT ``{"price"}`` changes the source and invalidates), ``/stats``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent.parent
Requester = Callable[[str, str, Any], tuple[int, Any]]


@contextlib.contextmanager
def django_requester(args: argparse.Namespace) -> Iterator[Requester]:
    from tests.apps import django_site

    django_site.configure(args.connection, args.channel, args.db, share=args.share)
    if args.create_tables:
        django_site.create_tables()
    django_site.watch_products()
    from django.test import Client

    client = Client()

    def request(method: str, path: str, body: Any) -> tuple[int, Any]:
        data = json.dumps(body) if body is not None else ""
        response = client.generic(method, path, data, content_type="application/json")
        return response.status_code, json.loads(response.content)

    yield request


@contextlib.contextmanager
def flask_requester(app: Any) -> Iterator[Requester]:
    client = app.test_client()

    def request(method: str, path: str, body: Any) -> tuple[int, Any]:
        response = client.open(path, method=method, json=body)
        return response.status_code, response.get_json()

    yield request


@contextlib.contextmanager
def fastapi_requester(args: argparse.Namespace) -> Iterator[Requester]:
    from fastapi.testclient import TestClient

    from tests.apps.fastapi_app import create_app

    with TestClient(create_app(args.connection, args.channel, args.source)) as client:

        def request(method: str, path: str, body: Any) -> tuple[int, Any]:
            response = client.request(method, path, json=body)
            return response.status_code, response.json()

        yield request


def serve(request: Requester, reader: IO[str], writer: IO[str]) -> None:
    """Answer requests until ``exit`` or the end of input."""
    writer.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    writer.flush()
    for line in reader:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        try:
            if req["op"] == "http":
                status, body = request(req["method"], req["path"], req.get("json"))
                reply: dict[str, Any] = {"ok": {"status": status, "body": body}}
            elif req["op"] == "seed":
                from tests.apps.shop.models import Product

                Product.objects.create(pk=req["pid"], name=req["name"], price=req["price"])
                reply = {"ok": None}
            else:
                reply = {"error": f"unknown op {req['op']!r}"}
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        writer.write(json.dumps({"id": req["id"], **reply}) + "\n")
        writer.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("framework", choices=["django", "flask", "fastapi"])
    parser.add_argument("--connection", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--source", default="")
    parser.add_argument("--db", default="")
    parser.add_argument("--create-tables", action="store_true")
    parser.add_argument("--share", default="", choices=["", "l2", "l2+update"])  # Django only
    parser.add_argument("--fork", action="store_true")
    parser.add_argument("--child-in", type=int)
    parser.add_argument("--child-out", type=int)
    args = parser.parse_args()
    if args.framework == "django":
        with django_requester(args) as request:
            serve(request, sys.stdin, sys.stdout)
    elif args.framework == "fastapi":
        with fastapi_requester(args) as request:
            serve(request, sys.stdin, sys.stdout)
    else:
        from tests.apps.flask_app import create_app

        # Made before the fork, like an app that gunicorn --preload imports in its master.
        app = create_app(args.connection, args.channel, args.source)
        if args.fork and os.fork() == 0:
            reader, writer = os.fdopen(args.child_in, "r"), os.fdopen(args.child_out, "w")
            with flask_requester(app) as request:
                serve(request, reader, writer)
            return
        if args.fork:
            os.close(args.child_in)
            os.close(args.child_out)
        with flask_requester(app) as request:
            serve(request, sys.stdin, sys.stdout)
        if args.fork:
            with contextlib.suppress(ChildProcessError):
                os.wait()


class AppProcess:
    """The test side of one app process (or of the child of a ``--fork`` host)."""

    def __init__(self, name: str, reader: IO[str], writer: IO[str], proc: Any = None) -> None:
        self.name = name
        self._reader, self._writer, self._proc = reader, writer, proc
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reading = threading.Thread(target=self._read, daemon=True)
        self._reading.start()
        self._next_id = 0
        first = self._replies.get(timeout=60)
        if not first or not first.get("ready"):
            raise RuntimeError(f"{name} did not start: {self.stderr()}")
        self.pid: int = first["pid"]

    def _read(self) -> None:
        for line in self._reader:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def stderr(self) -> str:
        """What the host wrote on stderr (read once it exited)."""
        if self._proc is None or self._proc.poll() is None or self._proc.stderr is None:
            return ""
        return str(self._proc.stderr.read())[-4000:]

    def call(self, op: str, timeout: float = 30.0, **fields: Any) -> Any:
        """Send one request and return its result (raise on an error reply)."""
        self._next_id += 1
        self._writer.write(json.dumps({"id": self._next_id, "op": op, **fields}) + "\n")
        self._writer.flush()
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no reply to {op} in {timeout}s") from None
        if reply is None:
            raise RuntimeError(f"{self.name} exited: {self.stderr()}")
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {op} failed: {reply['error']}")
        return reply["ok"]

    def http(self, method: str, path: str, body: Any = None) -> Any:
        """One request through the app's test client; its JSON body (status 200 expected)."""
        result = self.call("http", method=method, path=path, json=body)
        if result["status"] != 200:
            raise AssertionError(f"{self.name}: {method} {path} -> {result}")
        return result["body"]

    def close(self) -> None:
        """Ask the process to exit (and wait for it)."""
        with contextlib.suppress(OSError, ValueError):
            self._writer.write(json.dumps({"op": "exit"}) + "\n")
            self._writer.flush()
        with contextlib.suppress(OSError):
            self._writer.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
        self._reading.join(15)  # the end of its output: the process (or forked child) exited
        self._reader.close()


def start(framework: str, *args: str, name: str = "app") -> AppProcess:
    """Start one host process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.host", framework, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdin is not None
    return AppProcess(name, proc.stdout, proc.stdin, proc)


def start_forked(framework: str, *args: str) -> tuple[AppProcess, AppProcess]:
    """Start one host that makes its app, then forks: the parent and the child."""
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.apps.host",
            framework,
            *args,
            "--fork",
            "--child-in",
            str(to_child_r),
            "--child-out",
            str(from_child_w),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        pass_fds=(to_child_r, from_child_w),
    )
    os.close(to_child_r)
    os.close(from_child_w)
    assert proc.stdout is not None and proc.stdin is not None
    parent = AppProcess("parent", proc.stdout, proc.stdin, proc)
    child = AppProcess("child", os.fdopen(from_child_r, "r"), os.fdopen(to_child_w, "w"))
    return parent, child


if __name__ == "__main__":
    main()
