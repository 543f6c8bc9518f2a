"""The distribution as users get it: a wheel built by pip, installed into a fresh venv (and an
editable install of a fresh copy), where twistd finds both plugins and the package its data.

The venvs made here get their dependencies from this venv's site-packages through a plain path
line (a .pth line that is a path: .pth files in that directory are not processed, so this
checkout's own editable install does not leak in), and install the package itself with
``--no-deps``: what is tested is the package, not PyPI.
"""

from __future__ import annotations

import email
import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import circles

from ..support import ROOT

#: Files another part adds to the playground (a vendored library and its license): the wheel must take them.
VENDORED = {"vendor.min.js": "export const v = 1;\n", "vendor.min.js.LICENSE.txt": "MIT: the vendor\n",
            "LICENSE-vendor": "MIT: the vendor\n"}

TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def _pip(python, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))


def _copy_of_the_tree(dest: Path) -> Path:
    """The files a fresh clone would have (tracked and new, not ignored), symlinks kept."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if not os.path.lexists(source) or name.startswith(("node_modules/", "tests/", "bench/", "devtools/")):
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)
    return dest


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    tree = _copy_of_the_tree(tmp_path_factory.mktemp("clone") / "circles")
    for name, text in VENDORED.items():
        (tree / "circles" / "server" / "http" / "playground" / name).write_text(text)
    return tree


@pytest.fixture(scope="module")
def wheel(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    result = _pip(sys.executable, "wheel", "--no-deps", "-w", str(out), str(tree))
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("*.whl")
    return built


def _venv(path: Path) -> Path:
    """A fresh venv that sees this venv's libraries (not its circles) through a path line."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "zz_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _where_circles_is(python: Path, cwd: Path) -> str:
    return subprocess.run([str(python), "-c", "import circles; print(circles.__file__)"], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def _plugins(python: Path, cwd: Path) -> str:
    """What ``twistd --help`` lists, run from a directory holding no checkout."""
    result = subprocess.run([str(python), "-c", TWISTD, "--help"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_wheel_holds_the_package_its_data_and_metadata(wheel):
    assert wheel.name == "circles_gateway-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        # circles/openrpc.json is a symlink in the tree; in the wheel, a file with the document.
        info = z.getinfo("circles/openrpc.json")
        assert not stat.S_ISLNK(info.external_attr >> 16)
        assert z.read("circles/openrpc.json") == (ROOT / "openrpc.json").read_bytes()
        metadata = email.message_from_bytes(z.read("circles_gateway-0.1.0.dist-info/METADATA"))
        entry_points = z.read("circles_gateway-0.1.0.dist-info/entry_points.txt").decode()
    package = {p.relative_to(ROOT).as_posix() for p in (ROOT / "circles").rglob("*.py")}
    assert package <= names, package - names
    assert {"circles/py.typed", "twisted/plugins/circles_plugin.py", "circles/server/http/playground/index.html",
            "circles/server/http/playground/playground.js", "circles/server/http/playground/playground.css",
            "circles_gateway-0.1.0.dist-info/licenses/LICENSE"} <= names
    assert {f"circles/server/http/playground/{name}" for name in VENDORED} <= names
    assert "twisted/plugins/__init__.py" not in names  # Twisted's own: a plugin directory must not have one
    assert not [n for n in names if n.startswith(("tests/", "bench/", "devtools/")) or "__pycache__" in n]
    assert metadata["Name"] == "circles-gateway"
    assert metadata["Requires-Python"] == ">=3.11"
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Author"] == "The Circles developers"
    assert metadata["Version"] == circles.__version__  # read from the package: one source
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("autobahn") for r in requires)
    assert any(r.startswith("pytest") and 'extra == "test"' in r for r in requires)
    assert "circles = circles.client.cli:main" in entry_points


def test_the_installed_wheel_registers_both_twistd_plugins_and_the_command(wheel, tmp_path):
    python = _venv(tmp_path / "venv")
    result = _pip(sys.executable, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    assert result.returncode == 0, result.stdout + result.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _where_circles_is(python, elsewhere).startswith(str(tmp_path / "venv"))
    listed = _plugins(python, elsewhere)
    assert "circles " in listed and "circles-worker" in listed, listed
    # rpc.discover's document comes from the installed package data
    document = subprocess.run([str(python), "-c", "from circles.server.session.contracts import CONTRACTS; "
                               "print(CONTRACTS['gateway'].document_text())"],
                              cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert json.loads(document) == json.loads((ROOT / "openrpc.json").read_text())
    command = subprocess.run([str(tmp_path / "venv" / "bin" / "circles"), "pubkey", "--help"], cwd=elsewhere,
                             capture_output=True, text=True, timeout=60)
    assert command.returncode == 0 and "--key-file" in command.stdout, command.stderr


def test_an_editable_install_of_a_fresh_clone_registers_the_plugins_without_a_deprecation_banner(tree, tmp_path):
    python = _venv(tmp_path / "venv")
    result = _pip(sys.executable, "--python", str(python), "install", "--no-deps", "-e", str(tree))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Warning" not in output and "deprecat" not in output.lower() and "*****" not in output, output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _where_circles_is(python, elsewhere) == str(tree / "circles" / "__init__.py")
    listed = _plugins(python, elsewhere)
    assert "circles " in listed and "circles-worker" in listed, listed


def _older_python() -> str:
    for candidate in ["python3.10", "python3.9", *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0]*/bin/python3.10"))),
                      *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))]:
        found = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if found and subprocess.run([found, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return found
    pytest.skip("no Python older than 3.11 with pip on this machine")


def test_pip_on_an_older_python_says_why_in_one_line(wheel):
    python = _older_python()
    result = _pip(python, "install", "--dry-run", "--no-deps", "--no-index", str(wheel))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "requires a different Python" in errors[0] and ">=3.11" in errors[0], result.stderr


def test_the_try_outs_set_up_installs_what_running_needs_once_and_again_when_its_inputs_change(tree, tmp_path):
    """``scripts/setup --runtime`` (what ``./scripts/try`` runs first) in a fresh clone whose
    .venv records each pip run: no test extras, no banner, nothing on a second start, again
    once pyproject.toml changed; ``scripts/setup`` (the tests') then adds the test extras."""
    clone = _copy_of_the_tree(tmp_path / "clone")
    python = _venv(clone / ".venv")
    real = python.with_name("python-real")
    python.rename(real)
    runs = tmp_path / "pip-runs"
    python.write_text(f'#!/bin/sh\ncase "$*" in *"-m pip"*) echo "$*" >> {runs} ;; esac\nexec {real} "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI=true would apt-get each time

    def setup(*args) -> list:
        before = runs.read_text().splitlines() if runs.exists() else []
        result = subprocess.run([str(clone / "scripts" / "setup"), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "deprecat" not in output.lower() and "*****" not in output, output
        return [line for line in (runs.read_text().splitlines() if runs.exists() else [])[len(before):]
                if " install " in f" {line} "]

    first = setup("--runtime")
    assert [line for line in first if " -e " in line] == ["-m pip install -q -e ."], first
    assert _where_circles_is(python, tmp_path) == str(clone / "circles" / "__init__.py")
    # What no start then redoes: compiling the package, finding the plugins.
    assert list((clone / "circles" / "__pycache__").glob("service.*.pyc"))
    assert (clone / "twisted" / "plugins" / "dropin.cache").exists()
    assert setup("--runtime") == []  # the second start: nothing to install
    with open(clone / "pyproject.toml", "a") as f:
        f.write("# changed\n")
    assert [line for line in setup("--runtime") if " -e " in line] == ["-m pip install -q -e ."]
    assert [line for line in setup() if " -e " in line] == ["-m pip install -q -e .[test]"]
    assert setup("--runtime") == []  # the test extras hold all that running needs
    assert setup() == []


def test_no_pid_file_or_redis_dump_is_in_the_tree_and_git_ignores_both():
    """What running by hand leaves in the checkout (twistd's pid files, a private Redis's
    directory, a redis-server's dump.rdb) is never committed: none is tracked, and git ignores them."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode()
    assert [name for name in tracked.split("\0") if name.endswith((".pid", ".rdb"))] == []
    left_behind = ["twistd.pid", "v6.pid", "dump.rdb", "bench/dump.rdb", "circles-state/redis.sock", "state/user.key"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *left_behind], cwd=ROOT, capture_output=True,
                             text=True)
    assert ignored.stdout.split() == left_behind, ignored.stderr
