"""The first-bytes router against curl (the in-process tests: tests/unit/test_upgrade.py)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import pytest_twisted
from twisted.internet import threads

from circles.server.http.upgrade import MAX_LINE

from ..unit.test_upgrade import port  # noqa: F401 (fixture)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest_twisted.ensureDeferred
async def test_request_line_over_16k_with_curl(port):
    url = f"http://127.0.0.1:{port}/health?{'a' * (MAX_LINE + 10)}"
    done = await threads.deferToThread(subprocess.run, ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", url],
                                       capture_output=True, text=True, timeout=60)
    body, _, status = done.stdout.rpartition("\n")
    assert status == "414" and "request line over 16 KiB" in body, (done.stdout, done.stderr)
