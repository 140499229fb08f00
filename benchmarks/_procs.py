"""Worker processes (multiprocessing, spawn) that report through one queue.

A worker function receives a :class:`Control` first: ``report(kind, payload)`` sends a
message to the parent, ``wait_go()`` blocks until the parent releases every worker at once.
The parent collects messages by kind with a deadline; a worker that dies, raises or stays
silent past the deadline fails the measurement loudly, and every worker is terminated (then
killed) when the group closes.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Control", "WorkerError", "Workers"]


class WorkerError(RuntimeError):
    """A worker failed, died or timed out."""


class Control:
    """The worker's end: its name, the report queue and the start signal."""

    def __init__(self, name: str, reports: Any, go: Any) -> None:
        self.name = name
        self._reports = reports
        self._go = go

    def report(self, kind: str, payload: object = None) -> None:
        """Send ``(name, kind, payload)`` to the parent."""
        self._reports.put((self.name, kind, payload))

    def wait_go(self, timeout: float = 120.0) -> None:
        """Block until the parent calls :meth:`Workers.go`."""
        if not self._go.wait(timeout):
            raise WorkerError(f"{self.name}: no start signal within {timeout}s")


def _entry(target: Callable[..., object], control: Control, args: tuple[Any, ...]) -> None:
    try:
        result = target(control, *args)
    except BaseException:
        control.report("error", traceback.format_exc())
        raise SystemExit(1) from None
    control.report("result", result)


class Workers:
    """A group of spawned workers; use as a context manager so they are always reaped."""

    def __init__(self) -> None:
        self._ctx = mp.get_context("spawn")
        self._reports: Any = self._ctx.Queue()
        self._go: Any = self._ctx.Event()
        self._procs: dict[str, Any] = {}
        self._inbox: list[tuple[str, str, object]] = []

    def spawn(self, name: str, target: Callable[..., object], *args: object) -> None:
        """Start ``target(Control, *args)`` in a new process called ``name``."""
        control = Control(name, self._reports, self._go)
        proc = self._ctx.Process(
            target=_entry, args=(target, control, args), name=name, daemon=True
        )
        proc.start()
        self._procs[name] = proc

    def go(self) -> None:
        """Release every worker waiting in :meth:`Control.wait_go`."""
        self._go.set()

    def collect(self, kind: str, names: Iterable[str], timeout: float) -> dict[str, Any]:
        """Wait for one ``kind`` message from each of ``names``; return name → payload."""
        wanted = set(names)
        got: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while True:
            self._take(got, wanted, kind)
            if len(got) == len(wanted):
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(wanted - set(got))
                raise WorkerError(f"no {kind!r} from {missing} within {timeout:.0f}s")
            self._drain(min(remaining, 0.5))
            self._take(got, wanted, kind)
            for name in sorted(wanted - set(got)):
                proc = self._procs[name]
                if not proc.is_alive():
                    self._drain(0.2)  # it may have reported just before exiting
                    self._take(got, wanted, kind)
                    if name not in got:
                        raise WorkerError(
                            f"worker {name} exited (code {proc.exitcode}) before {kind!r}"
                        )

    def _drain(self, wait: float) -> None:
        """Move what the queue holds into the inbox, waiting up to ``wait`` for the first."""
        try:
            self._inbox.append(self._reports.get(timeout=wait))
            while True:
                self._inbox.append(self._reports.get_nowait())
        except queue_mod.Empty:
            pass

    def _take(self, got: dict[str, Any], wanted: set[str], kind: str) -> None:
        for message in list(self._inbox):
            name, got_kind, payload = message
            if got_kind == "error":
                raise WorkerError(f"worker {name} failed:\n{payload}")
            if name in wanted and got_kind == kind and name not in got:
                self._inbox.remove(message)
                got[name] = payload

    def close(self) -> None:
        """Terminate, then kill, every worker still running."""
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 3.0
        for proc in self._procs.values():
            proc.join(max(deadline - time.monotonic(), 0.05))
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        self._reports.close()
        self._reports.join_thread()

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_in_child(target: Callable[..., object], *args: object, timeout: float = 600.0) -> Any:
    """Run ``target(Control, *args)`` in one fresh process and return its result."""
    with Workers() as workers:
        workers.spawn("section", target, *args)
        return workers.collect("result", ["section"], timeout)["section"]
