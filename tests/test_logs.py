"""Every logger of the server and the worker obeys ``--log-level`` (circles.logs.Logger).

The client (:mod:`circles.client`) is left out on purpose: it runs in an application's process,
whose own observers decide what is kept; ``--log-level`` is the twistd plugins' option.
"""

from __future__ import annotations

import importlib
import pkgutil

import twisted.logger

import circles
from circles import logs


def _server_and_worker_modules() -> list:
    names = [info.name for info in pkgutil.walk_packages(circles.__path__, "circles.")]
    return [name for name in names if not (name == "circles.client" or name.startswith("circles.client."))
            and not name.endswith(".__main__")]  # a command: it runs when imported


def test_every_server_and_worker_logger_obeys_the_log_level():
    plain = []
    for name in _server_and_worker_modules():
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if isinstance(value, twisted.logger.Logger) and not isinstance(value, logs.Logger):
                plain.append(f"{name}.{attribute}")
    assert plain == []
    assert {"circles.webhooks", "circles.backend.dispatch", "circles.worker.service"} <= set(_server_and_worker_modules())
