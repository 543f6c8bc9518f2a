"""The command line of init scripts (``-k PK:FILE``, ``-c`` on the server) and of the Rust server's
TLS options (``--tls``, ``--cert``, ``--key``), parsed in this process. What they do with a real
redis-server, real ``twistd`` processes and a real TLS client: tests/integration/test_init_scripts.py."""

from __future__ import annotations

import pytest
from twisted.python import usage

from circles import server_tap
from circles.backend.init_scripts import InitScript, InitScriptError, once_key, parse_circles, split_circle
from circles.backend.redis_options import REDIS_URL_ENV
from circles.backend.scripts import DEFAULT_MAX_SCRIPT_SIZE
from circles.server.config import Config
from circles.worker import tap as worker_tap

from ..support import Key

URL = "redis://h:1/0"
CIRCLE = Key(b"\x01" * 32).pubkey
OTHER = Key(b"\x02" * 32).pubkey


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    monkeypatch.delenv(REDIS_URL_ENV, raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)


@pytest.fixture
def init_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "init.rhai").write_text('print("ready")\n', encoding="utf-8")
    return tmp_path / "init.rhai"


def server(*argv) -> server_tap.Options:
    options = server_tap.Options()
    options.parseOptions(["--redis-url", URL, *argv])
    return options


def worker(*argv) -> worker_tap.Options:
    options = worker_tap.Options()
    options.parseOptions(["--redis-url", URL, "--exec", "sh {script_file}", *argv])
    return options


def help_text(options: usage.Options) -> str:
    return " ".join(str(options).split())


# -- -k PK[:FILE] --------------------------------------------------------------------------------

def test_split_at_the_first_colon():
    assert split_circle(CIRCLE) == (CIRCLE, None)
    assert split_circle(f"{CIRCLE}:init.rhai") == (CIRCLE, "init.rhai")
    assert split_circle(f"{CIRCLE}:dir:with:colons/init.rhai") == (CIRCLE, "dir:with:colons/init.rhai")
    with pytest.raises(InitScriptError, match="no init script after ':'"):
        split_circle(f"{CIRCLE}:")


def test_the_server_reads_the_init_script_of_a_circle(init_file):
    options = server("-k", f"{CIRCLE}:init.rhai", "-k", OTHER)
    assert options.config.circles == {CIRCLE, OTHER}
    assert options.config.init_scripts == (InitScript(CIRCLE, 'print("ready")\n', "init.rhai"),)


def test_c_is_k_on_the_server_and_the_help_says_so(init_file):
    assert server("-c", f"{CIRCLE}:init.rhai").config == server("-k", f"{CIRCLE}:init.rhai").config
    assert server("-c", CIRCLE, "--circle", OTHER).config.circles == {CIRCLE, OTHER}
    text = help_text(server_tap.Options())
    assert "-k, --circle=" in text and "-c is -k too" in text and "PK:FILE" in text


def test_a_path_with_colons_after_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b").mkdir()
    (tmp_path / "a:b" / "init:1.rhai").write_text("1", encoding="utf-8")
    [init] = server("-k", f"{CIRCLE}:a:b/init:1.rhai").config.init_scripts
    assert (init.path, init.script) == ("a:b/init:1.rhai", "1")


def test_an_uncompressed_key_names_the_same_circle(init_file):
    key = Key(b"\x01" * 32)
    [init] = server("-k", f"{key.uncompressed}:init.rhai").config.init_scripts
    assert init.circle == CIRCLE


@pytest.mark.parametrize("make, value, message", [
    (None, f"{CIRCLE}:missing.rhai", "cannot read init script missing.rhai: No such file or directory"),
    ("directory", f"{CIRCLE}:init.d", "cannot read init script init.d: Is a directory"),
    ("empty", f"{CIRCLE}:empty.rhai", "init script empty.rhai is empty"),
    ("latin1", f"{CIRCLE}:latin1.rhai", "init script latin1.rhai is not UTF-8 text"),
    ("large", f"{CIRCLE}:large.rhai", f"init script large.rhai is larger than {DEFAULT_MAX_SCRIPT_SIZE} bytes "
                                      f"(--max-script-size)"),
    (None, f"{CIRCLE}:", "no init script after ':'"),
    (None, "abc:init.rhai", "invalid circle 'abc': public key is not hex"),
    ("two", f"{CIRCLE}:init.rhai -k {CIRCLE}:other.rhai", f"circle {CIRCLE} has two init scripts "
                                                          f"(init.rhai, other.rhai): give one"),
])
def test_an_init_script_that_cannot_be_used_stops_start_up_with_one_line(init_file, make, value, message):
    here = init_file.parent
    if make == "directory":
        (here / "init.d").mkdir()
    elif make == "empty":
        (here / "empty.rhai").write_text(" \n", encoding="utf-8")
    elif make == "latin1":
        (here / "latin1.rhai").write_bytes("print('\xe9')".encode("latin-1"))
    elif make == "large":
        (here / "large.rhai").write_text("x" * (DEFAULT_MAX_SCRIPT_SIZE + 1), encoding="utf-8")
    elif make == "two":
        (here / "other.rhai").write_text("2", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        server(*[item for part in value.split(" -k ") for item in ("-k", part)])
    assert str(e.value).startswith("circles: -k/--circle: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_server_reads_within_its_max_script_size(init_file):
    size = len(init_file.read_bytes())
    assert server("--max-script-size", str(size), "-k", f"{CIRCLE}:init.rhai").config.init_scripts
    with pytest.raises(SystemExit, match=rf"larger than {size - 1} bytes \(--max-script-size\)"):
        server("--max-script-size", str(size - 1), "-k", f"{CIRCLE}:init.rhai")


def test_the_same_init_script_twice_is_one(init_file):
    (init_file.parent / "copy.rhai").write_bytes(init_file.read_bytes())
    options = server("-k", f"{CIRCLE}:init.rhai", "-k", f"{CIRCLE}:copy.rhai", "-k", CIRCLE)
    assert [init.path for init in options.config.init_scripts] == ["init.rhai"]


def test_the_other_processes_get_the_circles_without_their_init_scripts(init_file):
    options = server("-k", f"{CIRCLE}:init.rhai", "--processes", "2")
    argv = ["-k", f"{CIRCLE}:init.rhai", "-c", OTHER, "--cert", "c.pem", "--processes", "2"]
    assert server_tap.child_argv(options, argv) == [f"--circle={CIRCLE}", f"--circle={OTHER}", "--cert=c.pem",
                                                     "--processes=1"]


def test_the_once_key_names_the_circle_and_the_scripts_digest():
    init = InitScript(CIRCLE, "print(1)", "a.rhai")
    key = once_key("circles:", init)
    assert key == f"circles:init:{CIRCLE}:{init.digest}" and len(init.digest) == 64
    # the text decides, not the file's name
    assert once_key("circles:", InitScript(CIRCLE, "print(1)", "b.rhai")) == key
    assert once_key("circles:", InitScript(CIRCLE, "print(2)", "a.rhai")) != key
    assert "print" not in repr(init)  # a Config's repr does not carry scripts


def test_a_config_refuses_an_init_script_of_a_circle_it_does_not_serve():
    init = InitScript(OTHER, "1", "a.rhai")
    with pytest.raises(ValueError, match="not served"):
        Config(circles=[CIRCLE], init_scripts=[init])
    with pytest.raises(ValueError, match="one init script"):
        Config(circles=[OTHER], init_scripts=[init, InitScript(OTHER, "2", "b.rhai")])
    assert Config(circles=[OTHER], init_scripts=[init]).init_scripts == (init,)


def test_parse_circles_names_its_limit():
    with pytest.raises(InitScriptError, match=r"larger than 0 bytes \(the limit\)"):
        parse_circles([f"{CIRCLE}:{__file__}"], 0, "the limit")


# -- the worker ---------------------------------------------------------------------------------

def test_the_worker_takes_k_with_an_init_script_and_keeps_c_for_concurrency(init_file):
    options = worker("-k", f"{CIRCLE}:init.rhai", "-k", OTHER, "-c", "3")
    assert options["circles"] == sorted([CIRCLE, OTHER]) and options["concurrency"] == 3
    assert options.init_scripts == (InitScript(CIRCLE, 'print("ready")\n', "init.rhai"),)
    assert worker("-k", CIRCLE).init_scripts == ()
    text = help_text(worker_tap.Options())
    assert "PK:FILE" in text and "-c is --concurrency here, not --circle as on the server" in text


def test_a_worker_init_script_that_cannot_be_used_is_a_usage_mistake(init_file):
    with pytest.raises(usage.UsageError, match="-k/--circle: cannot read init script nope.rhai"):
        worker("-k", f"{CIRCLE}:nope.rhai")
    (init_file.parent / "large.rhai").write_text("x" * (DEFAULT_MAX_SCRIPT_SIZE + 1), encoding="utf-8")
    with pytest.raises(usage.UsageError, match="the server's default --max-script-size"):
        worker("-k", f"{CIRCLE}:large.rhai")


def test_the_worker_service_gets_its_init_scripts(init_file):
    service = worker_tap.makeService(worker("-k", f"{CIRCLE}:init.rhai"))
    assert list(service.init_scripts.values()) == [InitScript(CIRCLE, 'print("ready")\n', "init.rhai")]


# -- --tls, --cert, --key ---------------------------------------------------------------------------

def test_cert_and_key_are_tls_cert_and_tls_key(tls_files):
    ours = server("--tls-cert", tls_files["cert"], "--tls-key", tls_files["key"])
    theirs = server("--tls", "--cert", tls_files["cert"], "--key", tls_files["key"])
    mixed = server("--cert", tls_files["cert"], "--tls-key", tls_files["key"])
    for options in (ours, theirs, mixed):
        assert (options["tls-cert"], options["tls-key"]) == (tls_files["cert"], tls_files["key"])
        assert options.config.tls is not None
    assert theirs["tls"] and not ours["tls"]
    assert server("--cert", tls_files["combined"]).config.tls is not None  # the key in the certificate's file


def test_help_lists_both_spellings():
    text = help_text(server_tap.Options())
    for line in ("--tls serve TLS (wss://), as the Rust server's --tls", "--tls-cert= PEM certificate",
                 "--cert= --tls-cert, by the Rust server's name", "--tls-key= PEM private key",
                 "--key= --tls-key, by the Rust server's name"):
        assert line in text, line
    assert "(also --cert)" in text and "(also --key)" in text


def test_the_new_names_take_no_other_options_prefix(tls_files):
    # getopt takes a unique prefix: "--key" and "--cert" are names of their own now, exact matches
    # win over longer names (--tls over --tls-cert, --tls-key, --tls-ciphers), and the prefixes
    # that were unique before still are.
    options = server_tap.Options()
    assert {"tls", "cert=", "key=", "tls-cert=", "tls-key="} <= set(options.longOpt)
    assert sorted(name for name in options.longOpt if name.startswith(("key", "cert"))) == ["cert=", "key="]
    assert server("--tls-k", tls_files["key"], "--tls-ce", tls_files["cert"])["tls-key"] == tls_files["key"]
    assert server("--ke", tls_files["key"], "--ce", tls_files["cert"])["tls-cert"] == tls_files["cert"]
    with pytest.raises(usage.UsageError, match="not a unique prefix"):
        server("--tls-c", tls_files["cert"])  # --tls-cert or --tls-ciphers, as before


@pytest.mark.parametrize("argv, message", [
    (["--tls"], "--tls needs the certificate to serve: --cert FILE (or --tls-cert FILE)"),
    (["--tls", "--key", "k.pem"], "--tls needs the certificate to serve"),
    (["--key", "k.pem"], "--tls-key needs --tls-cert (--key needs --cert)"),
    (["--cert", "a.pem", "--tls-cert", "b.pem"], "two certificates given (a.pem, b.pem): give one, with --tls-cert "
                                                 "or --cert"),
    (["--tls-key", "a.pem", "--key", "b.pem"], "two keys given (a.pem, b.pem): give one, with --tls-key or --key"),
])
def test_tls_option_mistakes(argv, message):
    with pytest.raises(usage.UsageError) as e:
        server(*argv)
    assert message in str(e.value)


def test_the_same_file_under_both_names_is_one(tls_files):
    options = server("--cert", tls_files["cert"], "--tls-cert", tls_files["cert"], "--key", tls_files["key"])
    assert options.config.tls is not None


def test_a_certificate_that_cannot_be_read_is_one_line_whichever_name(tmp_path):
    for name in ("--cert", "--tls-cert"):
        with pytest.raises(SystemExit) as e:
            server("--tls", name, str(tmp_path / "missing.pem"))
        assert str(e.value).startswith("circles: ") and "missing.pem" in str(e.value) and "\n" not in str(e.value)
