"""The systemd units of ``examples/systemd`` load: ``systemd-analyze verify`` finds nothing to
say of them, and every option their ``ExecStart`` gives exists.

``verify`` refuses a unit whose ``ExecStart`` names a program that is not there, and the units
name where the operator installs circles (``/opt/circles``); so the test verifies copies whose
``ExecStart`` names this venv's ``twistd`` instead, all else the same. A template unit is verified
as an instance (``circles-worker@payments.service``), so its ``%i`` is expanded.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from twisted.scripts._twistd_unix import ServerOptions

from circles import server_tap
from circles.worker import tap as worker_tap
from devtools.twistd import TWISTD

from ..support import ROOT

UNITS = ROOT / "examples" / "systemd"
INSTALLED_TWISTD = "/opt/circles/bin/twistd"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _unit(name: str) -> str:
    return (UNITS / name).read_text()


def _exec_start(text: str) -> list[str]:
    line = re.search(r"^ExecStart=(.*?)(?<!\\)$", text.replace("\\\n", " "), re.M).group(1)
    return shlex.split(line)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: the systemd package)")
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    copies = {"circles.service": "circles.service", "circles-worker@.service": "circles-worker@payments.service"}
    paths = []
    for name, copy in copies.items():
        text = _unit(name)
        assert INSTALLED_TWISTD in text
        (tmp_path / copy).write_text(text.replace(INSTALLED_TWISTD, TWISTD))
        paths.append(str(tmp_path / copy))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", *paths], capture_output=True, text=True,
                            timeout=120)
    said = [line for line in (result.stdout + result.stderr).splitlines()
            if any(copy.split("@")[0].split(".")[0] in line for copy in copies.values())]
    assert result.returncode == 0 and said == [], result.stdout + result.stderr


def test_the_units_run_twistd_with_options_that_exist_and_what_operators_expect():
    twistd_options = ServerOptions()
    plugins = {"circles": server_tap.Options(), "circles-worker": worker_tap.Options()}
    for name in ("circles.service", "circles-worker@.service"):
        text = _unit(name)
        for setting in ("Restart=on-failure", "LimitNOFILE=", "EnvironmentFile=/etc/circles/", "KillMode=mixed",
                        "TimeoutStopSec="):
            assert setting in text, (name, setting)
        argv = _exec_start(text)
        assert argv[0] == INSTALLED_TWISTD
        # The plugin: the first of their names that is not the value of twistd's --uid/--gid.
        split = next(i for i, word in enumerate(argv) if word in plugins and argv[i - 1] not in ("--uid", "--gid"))
        plugin = argv[split]
        for options, words in ((twistd_options, argv[1:split]), (plugins[plugin], argv[split + 1:])):
            for word in words:
                if word.startswith("--"):
                    assert word[2:].split("=")[0] in options.synonyms, (name, word)
    server = _exec_start(_unit("circles.service"))
    # Root binds 443, then twistd becomes circles; the worker is circles from the start.
    assert "User=root" in _unit("circles.service") and ["--uid", "circles"] == server[server.index("--uid"):][:2]
    assert "--port" in server and server[server.index("--port") + 1] == "443"
    assert "User=circles" in _unit("circles-worker@.service")
    assert "--uid" not in _exec_start(_unit("circles-worker@.service"))
