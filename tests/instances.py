"""Start cache instances as separate processes (``tests/instance.py``) and talk to them."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Instance:
    """A NearCache or AsyncNearCache living in its own Python process."""

    def __init__(
        self,
        connection: str,
        channel: str,
        *,
        driver: str = "sync",
        max_staleness: float = 2.0,
        name: str = "instance",
    ) -> None:
        self.name = name
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.instance",
                "--driver",
                driver,
                "--connection",
                connection,
                "--channel",
                channel,
                "--max-staleness",
                str(max_staleness),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        self._replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        self._next_id = 0
        first = self._replies.get(timeout=30)
        if not first or not first.get("ready"):
            raise RuntimeError(f"{name} did not start: {self.stderr()}")

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._replies.put(json.loads(line))
        self._replies.put(None)

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line)

    def stderr(self) -> str:
        """What the process wrote on stderr so far."""
        return "".join(self._stderr[-50:])

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> Any:
        """Send one request and return its result (raise on an error reply).

        ``timeout`` is the operation's own budget (``flush``, ``wait_gone``, ``burst``: the
        instance's default otherwise); the reply is awaited that long plus a margin, so a
        slow process is never mistaken for a failed operation."""
        self._next_id += 1
        request = {"id": self._next_id, "op": op, **fields}
        if timeout is not None:
            request["timeout"] = timeout
        wait = 30.0 if timeout is None else timeout + 30.0
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        try:
            reply = self._replies.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError(f"{self.name}: no reply to {op} in {wait}s") from None
        if reply is None:
            raise RuntimeError(f"{self.name} exited: {self.stderr()}")
        assert reply["id"] == self._next_id, reply
        if "error" in reply:
            raise RuntimeError(f"{self.name}: {op} failed: {reply['error']}")
        return reply["ok"]

    def wait_state(self, state: str, timeout: float = 10.0) -> None:
        """Wait until the backplane reports ``state``."""
        from tests.servers import wait_until

        wait_until(lambda: self.call("state") == state, timeout, message=f"{self.name} {state}")

    def close(self) -> None:
        """Ask the process to exit; kill it if it does not."""
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
