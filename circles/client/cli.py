"""The ``circles`` command: keys, and calls to a circle from the shell.

    circles keygen --out FILE        # or --out - : the private key to stdout, only when asked
    circles pubkey [--key-file FILE]
    circles whoami URL [--key-file FILE]
    circles play URL [--key-file FILE] [--scheme eth|ecdsa] (SCRIPT | -f FILE | -)
    circles discover URL
    circles members add|remove CIRCLE KEY    # who may play in a circle (kept in Redis)
    circles members list CIRCLE
    circles members policy CIRCLE [open|members]
    circles try                      # the one-command try-out (circles.tryout)
    circles tasks stats              # per circle: live workers, queue length, dead letters
    circles tasks stats --worker-protocol hero   # the hero work queues (their workers are not known)
    circles tasks dead-letter        # webhook tasks given up on: id, circle, source, attempts, last error
    circles tasks requeue (ID... | --all)
    circles --version

``python -m circles`` is the same command.

``circles tasks`` talks to the Redis that servers and workers share, found as a worker finds it:
``--redis-url``, else ``$CIRCLES_REDIS_URL`` / ``$REDIS_URL`` (or ./.env), else the private Redis
of a server started with ``--state-dir`` (the same default directory).

URL is the full circle URL (``wss://host:8443/<circle>``). A private key comes from
``--key-file`` or ``$CIRCLES_PRIVATE_KEY``, never from argv; without one, calls are anonymous.
``--json`` (after the command or before it) prints the JSON-RPC result instead of text, and makes
every outcome one JSON object on stdout: a failure is ``{"error": {...}, "kind": ..., "exit": N}``,
where ``error`` is the JSON-RPC error object (``code``, ``message``, ``data``) for ``kind``
``rpc``, else ``{"message": ...}`` for
``usage`` (the command line, a key, a URL, a --ca file: argparse's own mistakes included, whose
usage text stays on stderr), ``connection`` (refused, TLS, unknown circle, lost) and ``not_dead``
(``tasks requeue``); ``hint`` says what to do when there is something to say (-32001: give
--key-file). ``--help`` and ``--version`` print text: they are not calls. The stderr line is
printed either way.

``members`` and ``tasks`` talk to Redis, not to a server, and find it as the worker does: ``--redis-url``,
else ``$CIRCLES_REDIS_URL``, else ``$REDIS_URL`` (the environment, then ``./.env``), else the private
Redis of a server's ``--state-dir`` (default ``circles-state``).

Exit status: 0 success, 1 the server answered with a JSON-RPC error (``tasks requeue``: a task
was not in the dead-letter list), 2 bad usage or key (a URL naming no circle, a --ca file that
cannot be read, a Redis URL that is not one), 3 the server (for ``members`` and ``tasks``: Redis)
could not be reached (refused, TLS verification, unknown circle, connection lost).
A stdout closed early (``| head -1``) ends the command silently, by SIGPIPE, as it ends other tools.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

import circles
from circles.client import signing
from circles.common.wire import AUTH_REQUIRED

if TYPE_CHECKING:
    from twisted.python.failure import Failure

# Start-up: ``circles --version`` and ``circles keygen`` load argparse, coincurve and this module, and
# nothing else: Twisted, Autobahn and pyOpenSSL are imported by the commands that talk to a server
# (tests/integration/test_layout.py holds it).

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3

MEMBERS_ACTIONS = ("add", "remove", "list", "policy")


#: Said with -32001 (authentication required) when the call had no key.
AUTH_HINT = f"give --key-file FILE (or set ${signing.KEY_ENV}) to authenticate: this server lets only a key play"

#: What a failure was, in its --json object, by exit status (unless said otherwise).
KINDS = {EXIT_RPC_ERROR: "rpc", EXIT_USAGE: "usage", EXIT_CONNECTION: "connection"}


class _Exit(Exception):
    def __init__(self, status: int, message: str, error: dict | None = None, *, kind: str | None = None,
                 hint: str | None = None, printed: bool = False) -> None:
        super().__init__(message if hint is None else f"{message}; {hint}")
        self.status = status
        self.error = error if error is not None else {"message": message}  # the JSON-RPC error, else a message
        self.kind = kind or KINDS[status]
        self.hint = hint
        self.printed = printed  # its --json object is out already

    def to_json(self) -> dict:
        """What --json prints: ``{"error": {...}, "kind": ..., "exit": ...}`` (and ``hint``)."""
        value = {"error": self.error, "kind": self.kind, "exit": self.status}
        if self.hint is not None:
            value["hint"] = self.hint
        return value


class _Parser(argparse.ArgumentParser):
    """argparse's, but with ``--json`` a usage mistake is a JSON object on stdout too (the usage
    text still goes to stderr)."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            _print_json(_Exit(EXIT_USAGE, f"{self.prog}: {message}").to_json())
            raise SystemExit(EXIT_USAGE)
        super().error(message)


def _parser() -> _Parser:
    parser = _Parser(prog="circles", description="Talk to circles servers; make keys.")
    parser.add_argument("--version", action="version", version=f"circles {circles.__version__}")
    parser.add_argument("--json", action="store_true",
                        help="each command's --json, given before the command (circles --json whoami URL)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    output = _Parser(add_help=False)
    output.add_argument("--json", action="store_true",
                        help="print one JSON object on stdout, whatever the outcome: the result, or "
                        "{\"error\": {...}, \"kind\": rpc|usage|connection|not_dead, \"exit\": N}")

    key = _Parser(add_help=False)
    key.add_argument("--key-file", metavar="FILE",
                     help=f"private key file (hex; mode 0600). Default: ${signing.KEY_ENV}, else anonymous")

    remote = _Parser(add_help=False, parents=[output])
    remote.add_argument("url", metavar="URL", help="the circle's URL, e.g. wss://localhost:8443/<circle_pk>")
    remote.add_argument("--ca", metavar="FILE", help="trust this CA (PEM) for wss:// instead of the system's")
    remote.add_argument("--insecure", action="store_true",
                        help="do not verify the server's certificate (development only)")
    remote.add_argument("--connect-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="give up connecting after this long, or once a ping (one every 10 s) has had no "
                        "answer for this long: a server gone silent is found within 10 s plus this (default 30)")

    signer = _Parser(add_help=False, parents=[key])
    signer.add_argument("--scheme", choices=signing.SCHEMES, default="eth",
                        help="signature form: eth (personal_sign, default) or ecdsa (SHA-256)")

    keygen = commands.add_parser("keygen", parents=[output], help="make a new secp256k1 key")
    keygen.add_argument("--out", metavar="FILE", required=True,
                        help="write the private key here (mode 0600, never overwritten) and print the public key; "
                        "- prints the private key to stdout instead")

    commands.add_parser("pubkey", parents=[output, key], help="print the public key (the circle id form) of a key")

    commands.add_parser("whoami", parents=[remote, signer], help="who the server takes you for (authenticates if a key is given)")

    play = commands.add_parser("play", parents=[remote, signer], help="run a script in the circle and print its output")
    play.add_argument("script", nargs="?", metavar="SCRIPT", help="the script text, or - to read it from stdin")
    play.add_argument("-f", "--file", metavar="FILE", help="read the script from FILE")
    play.add_argument("--timeout", type=float, metavar="SECONDS", help="ask the server to stop the script after this long")

    commands.add_parser("discover", parents=[remote], help="print the server's OpenRPC document")

    # One parser, not one per action: parse_intermixed_args (options anywhere) takes no subparsers.
    members = commands.add_parser(
        "members", parents=[output], help="who may play in a circle: its policy and members, kept in Redis",
        description="Who may play in a circle, for every server sharing the Redis, from the next play on (no "
        "restart): 'policy CIRCLE members' admits the circle's members only, 'policy CIRCLE open' (the default) "
        "any key. add, remove and list change and show the members.")
    members.add_argument("action", choices=MEMBERS_ACTIONS, metavar="ACTION",
                         help="add CIRCLE KEY | remove CIRCLE KEY | list CIRCLE | policy CIRCLE [open|members]")
    members.add_argument("circle", metavar="CIRCLE", help="the circle's public key (hex)")
    members.add_argument("value", nargs="?", metavar="KEY|POLICY",
                         help="the member's public key (hex), or the policy to set: open or members")
    members.add_argument("--redis-url", metavar="URL",
                         help="the Redis the servers use (default: $CIRCLES_REDIS_URL, else $REDIS_URL, from the "
                         "environment or ./.env; else the private Redis of --state-dir)")
    # Their defaults are the plugins' (circles.common.options), read once the command runs: this module
    # loads nothing of the backend before then.
    members.add_argument("--redis-prefix", metavar="PREFIX",
                         help="prefix of every Redis key, as the servers' (default circles:)")
    members.add_argument("--state-dir", metavar="DIR",
                         help="a server's directory, whose private Redis to use (default circles-state)")
    members.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                         help="give up reaching Redis after this long (default 10)")

    tasks = commands.add_parser("tasks", help="the task queues in Redis: live workers, queues, dead letters")
    what = tasks.add_subparsers(dest="tasks_command", required=True, metavar="WHAT")
    redis = _Parser(add_help=False, parents=[output])
    redis.add_argument("--redis-url", metavar="URL", help="the Redis servers and workers share (default: "
                       "$CIRCLES_REDIS_URL, else $REDIS_URL, from the environment or ./.env; else the private Redis "
                       "of the server started with --state-dir)")
    redis.add_argument("--redis-prefix", metavar="PREFIX",
                       help="prefix of every Redis key (default: the one servers and workers default to)")
    redis.add_argument("--state-dir", metavar="DIR", help="state directory of the server whose private Redis to use")
    redis.add_argument("--connect-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="give up reaching Redis after this long (default 10)")
    stats = what.add_parser("stats", parents=[redis], help="per circle: live workers, queue length, dead letters")
    stats.add_argument("--worker-protocol", default="circles", metavar="PROTOCOL",
                       help="the servers' --worker-protocol: circles (default) or hero (the hero work queues; "
                       "hero's workers do not register, so their number is not known)")
    what.add_parser("dead-letter", parents=[redis],
                    help="webhook tasks given up on after their workers were lost: id, circle, source, attempts, "
                    "last error")
    requeue = what.add_parser("requeue", parents=[redis], help="put dead-lettered tasks back on their queues")
    requeue.add_argument("task_ids", nargs="*", metavar="ID", help="a task id from circles tasks dead-letter")
    requeue.add_argument("--all", action="store_true", help="every task in the dead-letter list")

    commands.add_parser("try", add_help=False,
                        help="run a server, Redis, a worker and the playground here (circles try --help)")
    return parser


def parse(argv: list) -> argparse.Namespace:
    """Options and positionals in any order (``play URL --key-file F 'script'``), ``--json`` before
    the command too (``circles --json whoami URL``).

    argparse cannot intermix them under subcommands, so the command picks its parser first.
    """
    parser = _parser()
    if "--json" in argv:
        _answer_usage_errors_in_json(parser)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    json_first = argv[:1] == ["--json"]
    if json_first:
        argv = argv[1:]
    if not argv or argv[0] not in commands.choices:
        return parser.parse_args(argv)  # help, or the usage error naming the commands
    if argv[0] == "try":
        if json_first:
            parser.error("--json: try prints text, not JSON")
        return argparse.Namespace(command="try", args=argv[1:])
    if argv[0] == "tasks":
        args = commands.choices["tasks"].parse_args(argv[1:])
        args.command = "tasks"
    else:
        args = commands.choices[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
    args.json = args.json or json_first
    return args


def _answer_usage_errors_in_json(parser: _Parser) -> None:
    parser.json_errors = True
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _answer_usage_errors_in_json(sub)


def _key(args: argparse.Namespace) -> Any:
    try:
        return signing.load_key(getattr(args, "key_file", None))
    except signing.KeyFileError as e:
        raise _Exit(EXIT_USAGE, str(e)) from None


def _script(args: argparse.Namespace) -> str:
    if args.file is not None and args.script is not None:
        raise _Exit(EXIT_USAGE, "give the script as SCRIPT, -f FILE or -, not two of them")
    if args.file is not None:
        try:
            with open(args.file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise _Exit(EXIT_USAGE, f"cannot read script {args.file}: {e}") from None
    if args.script is None:
        raise _Exit(EXIT_USAGE, "no script: give SCRIPT, -f FILE, or - to read stdin")
    if args.script == "-":
        return sys.stdin.read()
    return args.script


def _write_output(output: str) -> None:
    """A play's output on stdout, ending with a newline (docs/worker-protocol.md, "A play's output")."""
    sys.stdout.write(output if output.endswith("\n") or not output else output + "\n")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _local(args: argparse.Namespace) -> None:
    """keygen and pubkey: no network."""
    if args.command == "keygen":
        key = signing.generate()
        pubkey = signing.public_key(key)
        if args.out == "-":  # asked for: the private key on stdout, the public key on stderr
            if args.json:
                _print_json({"pubkey": pubkey, "private_key": key.secret.hex()})
            else:
                print(key.secret.hex())
                print(f"public key: {pubkey}", file=sys.stderr)
            return
        try:
            signing.write_key_file(args.out, key)
        except signing.KeyFileError as e:
            raise _Exit(EXIT_USAGE, str(e)) from None
        _print_json({"pubkey": pubkey, "key_file": args.out}) if args.json else print(pubkey)
        return
    key = _key(args)
    if key is None:
        raise _Exit(EXIT_USAGE, f"no key: give --key-file or set ${signing.KEY_ENV}")
    pubkey = signing.public_key(key)
    _print_json({"pubkey": pubkey}) if args.json else print(pubkey)


def _check_target(args: argparse.Namespace) -> None:
    """The URL and the TLS options, before connecting: what is wrong with them is a usage error."""
    from circles.client.connection import check_url
    from circles.common.tls_client import CAFileError, load_ca_file

    try:
        check_url(args.url)
    except ValueError as e:
        raise _Exit(EXIT_USAGE, str(e)) from None
    if args.ca is None and not args.insecure:
        return
    if not args.url.startswith("wss://"):
        raise _Exit(EXIT_USAGE, "--ca and --insecure are for wss:// URLs only")
    if args.ca is not None and args.insecure:
        raise _Exit(EXIT_USAGE, "give --ca FILE or --insecure, not both")
    if args.ca is not None:
        try:
            load_ca_file(args.ca)
        except CAFileError as e:
            raise _Exit(EXIT_USAGE, f"--ca: {e}") from None


async def _remote(reactor: Any, args: argparse.Namespace) -> None:
    from circles.client.connection import ConnectionClosed, RPCError, connect
    from circles.client.diagnostics import CertificateNotVerified, ConnectFailed

    _check_target(args)
    key = _key(args) if args.command in ("whoami", "play") else None
    script = _script(args) if args.command == "play" else None
    try:
        client = await connect(args.url, reactor=reactor, ca=args.ca, insecure=args.insecure,
                               timeout=args.connect_timeout)
    except CertificateNotVerified as e:
        raise _Exit(EXIT_CONNECTION, f"{e}; --ca FILE trusts a private CA, --insecure skips the check "
                    "(development only)") from None
    except ConnectFailed as e:
        raise _Exit(EXIT_CONNECTION, str(e)) from None
    try:
        if key is not None:
            await client.authenticate(key, args.scheme)
        if args.command == "whoami":
            result = await client.whoami()
            if args.json:
                _print_json(result)
            else:
                print(f"circle:        {result['circle']}\nauthenticated: {str(result['authenticated']).lower()}"
                      f"\npubkey:        {result['pubkey'] or '-'}")
        elif args.command == "play":
            output = await client.play(script, args.timeout)
            if args.json:
                _print_json({"output": output})
            else:
                _write_output(output)
        else:
            _print_json(await client.discover())
    except RPCError as e:
        if e.code == AUTH_REQUIRED and key is None:
            # The server's message ("...: call fetch_nonce and authenticate first") is for protocol
            # implementers; this command does both once it has a key.
            raise _Exit(EXIT_RPC_ERROR, f"error {e.code} {e.message.split(':')[0]}", e.to_json(),
                        hint=AUTH_HINT) from None
        if isinstance(e.data, dict) and isinstance(e.data.get("output"), str) and isinstance(e.data.get("error"), str):
            # -32005 of a script that printed before failing: its output, as a success's, then the error
            if not args.json:
                _write_output(e.data["output"])
            raise _Exit(EXIT_RPC_ERROR, f"error {e.code} {e.message}: {e.data['error']}", e.to_json()) from None
        raise _Exit(EXIT_RPC_ERROR, f"error {e}", e.to_json()) from None
    except ConnectionClosed as e:
        raise _Exit(EXIT_CONNECTION, str(e)) from None
    finally:
        if client.connected:
            await client.close()


async def _tasks(reactor: Any, args: argparse.Namespace) -> None:
    """``circles tasks ...``: the backend's modules are loaded here only (``circles keygen`` and
    the rest of the command load none of them)."""
    from twisted.python import usage
    from txredisapi import RedisError

    from circles.backend import admin
    from circles.backend.embedded import DEFAULT_STATE_DIR
    from circles.backend.redis import connect
    from circles.backend.redis_options import choose_redis
    from circles.backend.redis_url import InvalidRedisURL
    from circles.common.options import read_dotenv

    if args.tasks_command == "requeue" and bool(args.task_ids) == bool(args.all):
        raise _Exit(EXIT_USAGE, "give the task ids to requeue, or --all, not both")
    try:
        choice = choose_redis({"redis-url": args.redis_url, "state-dir": args.state_dir or DEFAULT_STATE_DIR},
                              reactor, read_dotenv())
    except (usage.UsageError, InvalidRedisURL) as e:
        raise _Exit(EXIT_USAGE, str(e)) from None
    factory = connect(choice.address, reactor, reply_timeout=args.connect_timeout)
    try:
        ready = factory.getConnection(peek=True)
        ready.addTimeout(args.connect_timeout, reactor)
        try:
            await ready
        except Exception:
            hint = " (is the server running with this --state-dir?)" if choice.private else ""
            raise _Exit(EXIT_CONNECTION, f"cannot reach Redis at {choice.address.where()}{hint}") from None
        try:
            await _tasks_command(factory.handler, args, admin)
        except RedisError as e:
            raise _Exit(EXIT_CONNECTION, f"Redis: {e}") from None
    finally:
        await factory.disconnect()


async def _tasks_command(redis: Any, args: argparse.Namespace, admin: ModuleType) -> None:
    from circles.backend.tasks import DEFAULT_PREFIX

    prefix = DEFAULT_PREFIX if args.redis_prefix is None else args.redis_prefix
    if args.tasks_command == "stats":
        from circles.backend import worker_protocols

        try:
            schema = worker_protocols.schema(worker_protocols.check(args.worker_protocol))
        except ValueError as e:
            raise _Exit(EXIT_USAGE, f"--worker-protocol: {e}") from None
        if schema is None:
            stats = await admin.circle_stats(redis, prefix)
        else:  # its workers do not register, and it has no dead-letter list: neither is known
            stats = await admin.job_queue_stats(redis, schema)
        dead = None if schema is not None else sum(s.dead or 0 for s in stats)
        if args.json:
            _print_json({"circles": [{"circle": s.circle, "workers": s.workers, "queue": s.queue, "dead": s.dead}
                                     for s in stats], "dead_letters": dead})
            return

        def shown(n: int | None) -> str:
            return "-" if n is None else str(n)

        print(f"{'circle':<66}  {'workers':>7}  {'queue':>7}  {'dead':>5}")
        for s in stats:
            print(f"{s.circle:<66}  {shown(s.workers):>7}  {s.queue:>7}  {shown(s.dead):>5}")
        if not stats:
            print("(no circle has a queue, a live worker or a dead letter)")
        elif schema is not None:
            print(f"(workers: not known in the {schema.name} protocol, whose workers do not register)")
        return
    if args.tasks_command == "dead-letter":
        letters = await admin.dead_letters(redis, prefix)
        if args.json:
            _print_json([{"task_id": d.task_id, "circle": d.circle, "source": d.source, "attempts": d.attempts,
                          "error": d.error, "updated_at": d.updated_at} for d in letters])
            return
        for d in letters:
            error = d.error.replace("\n", " ")
            print(f"{d.task_id}  {d.circle}  {d.source}  attempts {d.attempts}  {error}")
        if not letters:
            print("(the dead-letter list is empty)", file=sys.stderr)
        return
    done, missing = await admin.requeue(redis, prefix, None if args.all else args.task_ids)
    if args.json:
        _print_json({"requeued": done, "not_dead": missing})
    else:
        for task_id in done:
            print(f"requeued {task_id}")
    if missing:
        raise _Exit(EXIT_RPC_ERROR, f"not in the dead-letter list: {', '.join(missing)}", kind="not_dead",
                    printed=args.json)


def main(argv: list | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.command == "try":
        from circles import tryout
        tryout.main(args.args)
        return
    if args.command in ("keygen", "pubkey"):
        try:
            try:
                _local(args)
            except _Exit as e:
                _fail(args, e)
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()
        return

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        try:
            try:
                if args.command == "tasks":
                    await _tasks(reactor, args)
                elif args.command == "members":
                    await _members(reactor, args)
                else:
                    await _remote(reactor, args)  # closes its connection however it ends
            except _Exit as e:
                _fail(args, e)
            sys.stdout.flush()
        except BrokenPipeError:
            _stdout_closed()

    react(lambda reactor: ensureDeferred(run(reactor)))


# -- members: who may play in a circle ---------------------------------------------------------

def _members_args(args: argparse.Namespace) -> tuple[str, str | None]:
    """(circle, key or policy), normalised and checked: mistakes are usage errors."""
    from circles.backend import members
    from circles.common.keys import InvalidKey, normalize_pubkey

    try:
        circle = normalize_pubkey(args.circle)
    except InvalidKey as e:
        raise _Exit(EXIT_USAGE, f"CIRCLE: {e}") from None
    value = args.value
    if args.action in ("add", "remove"):
        if value is None:
            raise _Exit(EXIT_USAGE, f"members {args.action} needs the member's KEY: members {args.action} CIRCLE KEY")
        try:
            value = normalize_pubkey(value)
        except InvalidKey as e:
            raise _Exit(EXIT_USAGE, f"KEY: {e}") from None
    elif args.action == "list" and value is not None:
        raise _Exit(EXIT_USAGE, "members list takes the CIRCLE only")
    elif args.action == "policy" and value is not None and value not in members.POLICIES:
        raise _Exit(EXIT_USAGE, f"unknown policy {value!r}: {' or '.join(members.POLICIES)}")
    return circle, value


async def _members(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.python import usage
    from txredisapi import RedisError

    from circles.backend import members, tasks
    from circles.backend.embedded import DEFAULT_STATE_DIR
    from circles.backend.reachability import Reachability
    from circles.backend.redis import connect
    from circles.backend.redis_options import choose_redis
    from circles.backend.redis_url import InvalidRedisURL
    from circles.common.options import read_dotenv

    circle, value = _members_args(args)
    if args.redis_prefix is None:
        args.redis_prefix = tasks.DEFAULT_PREFIX
    try:
        redis = choose_redis({"redis-url": args.redis_url, "state-dir": args.state_dir or DEFAULT_STATE_DIR},
                             reactor, read_dotenv())
    except (usage.UsageError, InvalidRedisURL) as e:
        raise _Exit(EXIT_USAGE, str(e) if str(e).startswith("--redis-url") else f"--redis-url: {e}") from None
    factory = connect(redis.address, reactor, reply_timeout=args.connect_timeout)
    refused = []  # why Redis would not let us in (password, database): txredisapi stops trying then

    def stop_waiting(failure: Failure) -> None:
        refused.append(failure.getErrorMessage())
        waiting.cancel()

    try:
        waiting = factory.getConnection(peek=True)
        waiting.addTimeout(args.connect_timeout, reactor)
        factory.deferred.addErrback(stop_waiting)
        try:
            connection = await waiting
        except Exception:
            if refused:
                raise _Exit(EXIT_CONNECTION, f"Redis at {redis.address.where()} refused the connection "
                            f"({refused[0].replace('Redis error: ', '')}): check the credentials and database "
                            "of --redis-url") from None
            hint = Reachability(redis.address, reactor, private=redis.private).hint()
            raise _Exit(EXIT_CONNECTION, f"cannot reach Redis at {redis.address.where()} within "
                        f"{args.connect_timeout:g}s; {hint}") from None
        try:
            await _members_action(connection, members, args, circle, value)
        except RedisError as e:
            raise _Exit(EXIT_CONNECTION, f"Redis error: {e}") from None
    finally:
        await factory.disconnect()


async def _members_action(redis: Any, members: ModuleType, args: argparse.Namespace, circle: str,
                          value: str | None) -> None:
    prefix = args.redis_prefix
    if args.action == "policy":
        if value is not None:
            await members.set_policy(redis, prefix, circle, value)
        policy = await members.get_policy(redis, prefix, circle)
        count = len(await members.members(redis, prefix, circle)) if policy == members.MEMBERS else None
        if args.json:
            _print_json({"circle": circle, "policy": policy})
        else:
            print(f"{circle}: {members.describe(policy, count)}")
        return
    if args.action == "list":
        keys = await members.members(redis, prefix, circle)
        if args.json:
            _print_json({"circle": circle, "policy": await members.get_policy(redis, prefix, circle), "members": keys})
        else:
            for key in keys:
                print(key)
            if not keys:
                policy = await members.get_policy(redis, prefix, circle)
                print(f"(no members; {members.describe(policy, 0)})", file=sys.stderr)
        return
    changed = await (members.add if args.action == "add" else members.remove)(redis, prefix, circle, value)
    policy = await members.get_policy(redis, prefix, circle)
    if args.json:
        _print_json({"circle": circle, "key": value, "changed": changed, "policy": policy})
    elif args.action == "add":
        print(f"{value}: {'added to' if changed else 'already one of'} the members of {circle}")
    else:
        print(f"{value}: {'removed from' if changed else 'not one of'} the members of {circle}")
    if policy == members.OPEN and not args.json:
        print(f"note: {circle} is open (any key may play); `circles members policy {circle} members` admits its "
              "members only", file=sys.stderr)


def _stdout_closed() -> None:
    """Whoever read stdout is gone (``circles whoami URL | head -1``): end silently, killed by
    SIGPIPE as other Unix tools are. Python ignores SIGPIPE, so writing raised BrokenPipeError
    instead, which would end in a traceback (the Python docs' note on SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush into the broken pipe, should we live on
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    os._exit(128 + signal.SIGPIPE)  # not reached: what a shell reports for a command SIGPIPE ended


def _fail(args: argparse.Namespace, error: _Exit) -> None:
    if getattr(args, "json", False) and not error.printed:
        _print_json(error.to_json())
    print(f"circles: {error}", file=sys.stderr)
    sys.stdout.flush()
    raise SystemExit(error.status)


if __name__ == "__main__":
    main()
