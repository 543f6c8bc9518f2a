"""What every command line of the package shares (the two twistd plugins and the ``circles``
command): option value converters, one-line usage mistakes, secret files, ``.env`` and the
environment. Which Redis those options name is :mod:`circles.backend.redis_options`.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Callable, Mapping

from twisted.copyright import version as twisted_version
from twisted.python import usage

import circles

#: The largest secret file read (a secret, a URL, a few dozen webhook secrets): a path given by
#: mistake (a log, a device) is refused, not read whole.
MAX_SECRET_FILE = 64 * 1024
DOTENV = ".env"  # read from the working directory, below the environment (as the Rust server's dotenv)


def positive(kind: Callable) -> Callable[[str], object]:
    """A converter of ``kind`` (int, float) refusing zero and below."""
    def convert(text: str) -> object:
        value = kind(text)
        if not value > 0:
            raise ValueError(f"{text} is not positive")
        return value
    convert.__name__ = kind.__name__  # usage.Options names the type in its error message
    return convert


def at_least_zero(kind: Callable) -> Callable[[str], object]:
    """A converter for limits where 0 means "no limit" (or "off")."""
    def convert(text: str) -> object:
        value = kind(text)
        if value < 0:
            raise ValueError(f"{text} is negative")
        return value
    convert.__name__ = kind.__name__
    return convert


def print_version() -> None:
    """``--version`` of both plugins: circles' version first (twistd alone prints Twisted's)."""
    print(f"circles {circles.__version__}\nTwisted {twisted_version}\nPython {platform.python_version()}")
    raise SystemExit(0)


def _naming_the_option(name: str, dispatch: Callable) -> Callable:
    def named(parameter: str, value: str) -> None:
        try:
            dispatch(parameter, value)
        except usage.UsageError as e:
            raise usage.UsageError(f"--{name}: {str(e).replace(_TYPE_ENFORCEMENT, '')}") from None
    return named


_TYPE_ENFORCEMENT = "Parameter type enforcement failed: "


def one_line_mistakes(options: type, command: str) -> type:
    """``options`` (a plugin's ``usage.Options``) as twistd is given it: a usage mistake is one
    line on stderr, ``COMMAND: REASON (twistd COMMAND --help lists the options)``, and exit status
    2, where twistd would print the whole usage text with the reason last (and exit 1).

    The plugins' other start-up mistakes (a file that cannot be read, a bad key) are already one
    line (``SystemExit``), exit status 1. ``options`` itself still raises ``UsageError``, for code
    that parses options.

    To name the option in a type mistake it wraps each ``CoerceParameter``'s ``dispatch``, found
    in ``usage.Options._dispatch`` (private to Twisted, which has no public way to it; the
    Twisted code relied on is pinned by ``tests/integration/test_dependencies.py``).
    """
    class OneLine(options):
        def __init__(self) -> None:
            super().__init__()
            for name, handler in self._dispatch.items():
                if isinstance(handler, usage.CoerceParameter):  # its message does not name the option
                    handler.dispatch = _naming_the_option(name, handler.dispatch)  # type: ignore[method-assign]

        def parseOptions(self, argv: list[str] | None = None) -> None:
            try:
                super().parseOptions(argv)
            except usage.UsageError as e:
                sys.stderr.write(f"{command}: {e} (twistd {command} --help lists the options)\n")
                sys.stderr.flush()
                raise SystemExit(2) from None

    OneLine.__name__ = OneLine.__qualname__ = options.__name__
    OneLine.__module__ = options.__module__
    return OneLine


class SecretFileError(ValueError):
    """A secret file cannot be read; the message names the file, never what it holds."""


def read_secret_file(path: str) -> str:
    """The text of a file holding secrets (a Redis URL with its password, webhook signing
    secrets): what ``--redis-url-file`` and ``--stripe-secret-file`` name, a file only the
    service's user may read (systemd's ``LoadCredential=``, a Kubernetes secret volume), so that
    no secret is on the command line, which every user of the machine can read."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_SECRET_FILE + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise SecretFileError(f"cannot read {path}: {getattr(e, 'strerror', None) or e.__class__.__name__}") from None
    if len(text) > MAX_SECRET_FILE:
        raise SecretFileError(f"{path} is larger than {MAX_SECRET_FILE // 1024} KiB: not a secret file")
    return text


_DOTENV_LINE = re.compile(r"(?:export )?([A-Za-z_][A-Za-z0-9_]*)=(.*)")
_BARE_VALUE = re.compile(r"[^\s'\"\\$`#]*")


class DotenvError(ValueError):
    """A ``.env`` file is unreadable or malformed; the message names the line, never a value."""


def parse_dotenv(text: str, name: str = DOTENV) -> dict[str, str]:
    """The variables of a ``.env`` file, strictly: ``NAME=value`` lines (``export`` allowed),
    blank lines and ``#`` comment lines. A value is bare (no spaces, quotes, ``#``, ``$``, `````
    or backslash), or single-quoted and taken literally, or double-quoted without any of those
    (no escapes, no ``${VAR}`` substitution: what differs between dotenv dialects is refused,
    not guessed)."""
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _DOTENV_LINE.fullmatch(line)
        if match is None:
            raise DotenvError(f"{name}, line {number}: expected NAME=value (no spaces around '=')")
        variable, raw = match.groups()
        if len(raw) >= 2 and raw[0] == raw[-1] == "'" and "'" not in raw[1:-1]:
            value = raw[1:-1]
        elif len(raw) >= 2 and raw[0] == raw[-1] == '"' and _BARE_VALUE.fullmatch(raw[1:-1].replace(" ", "")):
            value = raw[1:-1]
        elif _BARE_VALUE.fullmatch(raw):
            value = raw
        else:
            raise DotenvError(f"{name}, line {number}: the value of {variable} has spaces, quotes, '#', '$', '`' or "
                              f"'\\' that this parser does not guess at: put it in single quotes")
        values[variable] = value
    return values


def read_dotenv(directory: str = ".") -> tuple[str, dict[str, str]]:
    """``(path, variables)`` of the ``.env`` file in ``directory`` (the working directory: never
    a parent's), empty without one. One that cannot be read or parsed ends start-up."""
    path = os.path.join(os.path.abspath(directory), DOTENV)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return path, {}
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"circles: cannot read {path}: {getattr(e, 'strerror', None) or e.__class__.__name__}") from None
    try:
        return path, parse_dotenv(text, path)
    except DotenvError as e:
        raise SystemExit(f"circles: {e}") from None


def from_environment(names: tuple[str, ...], environ: Mapping[str, str] | None = None,
                     dotenv: tuple[str, Mapping[str, str]] | None = None
                     ) -> tuple[str | None, str | None, tuple[str, ...]]:
    """``(value, source, ignored)``: the value of the first of ``names`` set (non-empty) in the
    environment, else in the ``.env`` file (``dotenv``: :func:`read_dotenv`'s answer; it never
    overrides the environment), where it came from (``$NAME`` or ``NAME in /path/.env``), and
    the later names also set there that it overrides."""
    environ = os.environ if environ is None else environ
    sources = [(environ, "${}")]
    if dotenv is not None:
        sources.append((dotenv[1], "{} in " + dotenv[0].replace("{", "{{").replace("}", "}}")))
    for mapping, label in sources:
        found = [name for name in names if mapping.get(name)]
        if found:
            return mapping[found[0]], label.format(found[0]), tuple(label.format(name) for name in found[1:])
    return None, None, ()


def describe_source(what: str, source: str, ignored: tuple[str, ...] = ()) -> str:
    """A start-up log line naming where ``what`` came from (a variable, never its value)."""
    line = f"{what} from {source}"
    if ignored:
        line += f" ({', '.join(ignored)} also set: ignored)"
    return line
