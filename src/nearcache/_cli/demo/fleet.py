"""The coordinator's side of the demo's control channel: instance processes and their replies.

Each instance is a ``python -m nearcache._cli.demo.instance`` child. Requests go as JSON lines
to its stdin; one reader thread per child matches the replies on its stdout to the waiting
:class:`Call`. Every wait has a deadline, and a child that dies fails its calls at once.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nearcache

__all__ = ["Call", "InstanceError", "InstanceProcess", "close_all"]

Reply = dict[str, Any]


class InstanceError(Exception):
    """An instance did not answer in time, answered with an error, or died."""


class Call:
    """One request in flight: its replies by stage (``armed``, ``done``)."""

    def __init__(self, instance: InstanceProcess, op: str) -> None:
        self._instance = instance
        self._op = op
        self._cond = threading.Condition()
        self._stages: dict[str, Reply] = {}
        self._failure: str | None = None

    def _deliver(self, stage: str, reply: Reply) -> None:
        with self._cond:
            self._stages[stage] = reply
            self._cond.notify_all()

    def _fail(self, reason: str) -> None:
        with self._cond:
            self._failure = reason
            self._cond.notify_all()

    def wait(self, timeout: float, stage: str = "done") -> Reply:
        """The reply of ``stage``; raises :class:`InstanceError` on error, death or timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while stage not in self._stages:
                if "done" in self._stages:  # finished early (an error) without that stage
                    stage = "done"
                    break
                if self._failure is not None:
                    raise InstanceError(f"{self._instance.name}: {self._op}: {self._failure}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InstanceError(
                        f"{self._instance.name}: no answer to {self._op!r} within {timeout:g}s"
                    )
                self._cond.wait(remaining)
            reply = self._stages[stage]
        if not reply.get("ok", True):
            raise InstanceError(f"{self._instance.name}: {self._op}: {reply.get('error')}")
        return reply


class InstanceProcess:
    """One demo instance process and its control channel."""

    def __init__(self, name: str, proc: subprocess.Popen[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.instance_id = ""
        self._proc = proc
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: dict[int, Call] = {}
        self._dead: str | None = None
        self._hello = Call(self, "start")
        self._calls[0] = self._hello
        self._reader = threading.Thread(
            target=self._read_replies, name=f"demo-reader-{name}", daemon=True
        )
        self._reader.start()

    @classmethod
    def spawn(cls, name: str, config: dict[str, Any], workdir: Path) -> InstanceProcess:
        """Start the child process and hand it its configuration; return at once."""
        log_path = workdir / f"instance-{name}.log"
        env = dict(os.environ)
        # The child must import this very nearcache, installed or not.
        package_root = str(Path(nearcache.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH", "")) if p
        )
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nearcache._cli.demo.instance"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                encoding="utf-8",
                bufsize=1,
                env=env,
                cwd=workdir,
            )
        instance = cls(name, proc, log_path)
        try:
            instance._write({"name": name, **config})
        except OSError as exc:  # it died at once; wait_started() reports it
            instance._mark_dead(f"control channel broken ({exc})")
        return instance

    # -- state ------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """Whether the child still runs and its control channel is open."""
        return self._dead is None and self._proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        """The end of the child's stderr log (for error reports)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- requests ---------------------------------------------------------------------------

    def wait_started(self, timeout: float) -> None:
        """Wait for the child's hello (its cache exists; it may still be connecting)."""
        reply = self._hello.wait(timeout)
        self.instance_id = str(reply.get("instance_id", ""))

    def send(self, op: str, **args: Any) -> Call:
        """Send a request; wait on the returned :class:`Call`."""
        call = Call(self, op)
        with self._lock:
            if self._dead is not None:
                call._fail(self._dead)
                return call
            ident = next(self._ids)
            self._calls[ident] = call
        try:
            self._write({"id": ident, "op": op, **args})
        except OSError as exc:
            self._mark_dead(f"control channel broken ({exc})")
        return call

    def call(self, op: str, timeout: float = 5.0, **args: Any) -> Reply:
        """Send a request and wait for its final reply."""
        return self.send(op, **args).wait(timeout)

    def _write(self, message: Reply) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        with self._lock:
            stdin.write(json.dumps(message) + "\n")
            stdin.flush()

    def _read_replies(self) -> None:
        stdout = self._proc.stdout
        assert stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stdout:
                try:
                    reply = json.loads(line)
                    ident = int(reply["id"])
                    stage = str(reply.get("stage", "done"))
                except (ValueError, KeyError, TypeError):
                    continue  # not a protocol line
                with self._lock:
                    call = self._calls.get(ident)
                    if stage == "done":
                        self._calls.pop(ident, None)
                if call is not None:
                    call._deliver(stage, reply)
        try:
            code: int | None = self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        self._mark_dead(
            "closed its control channel" if code is None else f"the process exited (code {code})"
        )

    def _mark_dead(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            calls = list(self._calls.values())
            self._calls.clear()
        for call in calls:
            call._fail(reason)

    # -- stopping ---------------------------------------------------------------------------

    def begin_close(self) -> None:
        """Ask the child to stop (its stdin closes: it closes its cache and exits)."""
        stdin = self._proc.stdin
        with contextlib.suppress(OSError, ValueError):
            if stdin is not None:
                with self._lock:
                    stdin.close()

    def finish_close(self, timeout: float) -> None:
        """Wait for the child to exit; terminate, then kill it, if it does not."""
        for step in (self._proc.terminate, self._proc.kill):
            try:
                self._proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    step()
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=timeout)
        self._reader.join(timeout=1.0)
        with contextlib.suppress(OSError, ValueError):
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def close_all(instances: list[InstanceProcess], timeout: float = 3.0) -> None:
    """Stop every instance: ask them all at once, then wait for each (bounded)."""
    for instance in instances:
        instance.begin_close()
    for instance in instances:
        instance.finish_close(timeout)
