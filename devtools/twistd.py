"""A ``twistd -n circles ...`` process as the tests and the benchmarks run it: started with its log
on a pipe, read in a thread to learn its port, stopped with SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

#: The twistd of this interpreter's environment.
TWISTD = str(Path(sys.executable).with_name("twistd"))


class Twistd:
    """A ``twistd -n circles ...`` process whose log we read to learn its port."""

    def __init__(self, args: list, cwd: Path, plugin: str = "circles", options: tuple = (),
                 prefix: tuple = ()) -> None:
        self.lines: list = []
        self._port_seen = threading.Event()
        self.port: int | None = None
        self.proc = subprocess.Popen(
            [*prefix, TWISTD, "-n", "--pidfile=", "--logfile=-", *options, plugin, *args],
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            match = re.search(r"starting on (\d+)", line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._port_seen.set()
        self._port_seen.set()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` appears in the log (e.g. "connected to Redis")."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{text!r} never logged:\n" + self.output)
            time.sleep(0.05)

    def wait_listening(self, timeout: float = 30) -> int:
        self._port_seen.wait(timeout)
        if self.port is None:
            raise AssertionError("twistd did not start listening:\n" + self.output)
        return self.port

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        """SIGTERM, as an operator or a service manager stops it; kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
