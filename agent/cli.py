"""`piagent`: the agent's command line (`piagent run` is what the systemd unit starts)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys

from . import __version__

DEFAULT_STATE_DIR = "/var/lib/piagent"
DEFAULT_CONFIG = "/etc/piagent/piagent.conf"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piagent", description="The pimaster agent for a Raspberry Pi.")
    parser.add_argument("--version", action="version", version=f"piagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (what the systemd service starts)")
    run.add_argument("--config", help="piagent.conf written by `pimaster token create` (default: take "
                     "piagent.conf from the boot partition into /etc/piagent, see --boot-dir)")
    run.add_argument("--boot-dir", action="append", metavar="DIR",
                     help="where to look for a piagent.conf dropped onto the SD card, in order "
                          "(repeatable; default /boot/firmware, then /boot); not with --config")
    run.add_argument("--etc-dir", default="/etc/piagent",
                     help="where the agent keeps its config, taken from the boot partition (default /etc/piagent)")
    run.add_argument("--id", help="node id (default: the id this agent enrolled with, else the hostname)")
    run.add_argument("--state-dir", default=os.environ.get("PIAGENT_STATE_DIR", DEFAULT_STATE_DIR),
                     help=f"keys and state (default {DEFAULT_STATE_DIR})")
    run.add_argument("--log-level", default="INFO")
    fp = sub.add_parser("fingerprint", help="print this agent's key fingerprint (compare with `pimaster keys list`)")
    fp.add_argument("--state-dir", default=os.environ.get("PIAGENT_STATE_DIR", DEFAULT_STATE_DIR))
    trust = sub.add_parser(
        "trust", help="pin the master's key fingerprint, or show what this agent trusts and why",
        description="Without a fingerprint in piagent.conf the agent trusts the first master that answers "
                    "at its address, and anyone on the LAN who answers first gets root on this node. "
                    "`piagent trust FINGERPRINT` pins the master instead (compare with `pimaster keys "
                    "fingerprint` on the master); restart the agent afterwards. Without FINGERPRINT: show "
                    "what is pinned or trusted now, and by what.")
    trust.add_argument("fingerprint", nargs="?", help="sha256:<64 hex digits>, as `pimaster keys fingerprint` prints it")
    trust.add_argument("--state-dir", default=os.environ.get("PIAGENT_STATE_DIR", DEFAULT_STATE_DIR),
                       help=f"the agent's state dir (default {DEFAULT_STATE_DIR})")
    trust.add_argument("--config", help=f"the agent's piagent.conf, whose fingerprint must agree (default {DEFAULT_CONFIG})")
    sub.add_parser("facts", help="print the facts this agent reports, as JSON")
    state = sub.add_parser("state", help="run one state on this node now, like a line of a state file",
                           description="Example: piagent state file.managed name=/etc/motd contents='hello' --test. "
                                       "`piagent state FUNCTION --help` prints that function's reference.",
                           add_help=False)
    state.add_argument("-h", "--help", action="store_true",
                       help="show this help, or with FUNCTION that function's reference (its arguments, an example)")
    state.add_argument("function", nargs="?", help="module.function, e.g. file.managed, or `list` for all of them")
    state.add_argument("args", nargs="*", metavar="ARG=VALUE",
                       help="arguments; a VALUE is read as JSON when it parses (true, 3, [\"a\"]), else as text")
    state.add_argument("--test", action="store_true", help="report what would change, change nothing")
    state.add_argument("--json", action="store_true", help="print the result as JSON")
    state.add_argument("--state-dir", default=os.environ.get("PIAGENT_STATE_DIR", DEFAULT_STATE_DIR))
    state.set_defaults(state_parser=state)
    return parser


def _unknown_function(function: str, known) -> str:
    from .states import close_names

    close = close_names(function, known)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"piagent: no state function {function!r} ({hint}see `piagent state list`)"


def run_single_state(args) -> int:
    from .engine import FAILED, run_states
    from .states import catalog, close_names, reference

    if args.function is None or (args.help and args.function == "list"):
        args.state_parser.print_help()
        return 0 if args.help else 2
    if args.help:
        if args.function not in catalog():
            print(_unknown_function(args.function, catalog()), file=sys.stderr)
            return 2
        sys.stdout.write(reference(args.function))
        return 0
    if args.function == "list":
        for name, info in sorted(catalog().items()):
            print(f"{name:24} {info['summary']}")
        return 0
    state_args = {}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"piagent: {item!r} is not ARG=VALUE", file=sys.stderr)
            return 2
        if key == "name":  # a name is what was typed: name=false runs `false`, name=0644 is "0644"
            state_args[key] = value
            continue
        try:
            state_args[key] = json.loads(value)
        except ValueError:
            state_args[key] = value
    if args.function not in catalog():
        print(_unknown_function(args.function, catalog()), file=sys.stderr)
        return 2
    known_args = catalog()[args.function]["args"]
    for key in state_args:
        if key not in known_args:
            close = close_names(key, known_args)
            print(f"piagent: {args.function} has no argument {key!r}"
                  + (f" (did you mean {close[0]!r}?)" if close else "")
                  + f"; `piagent state {args.function} --help` lists them", file=sys.stderr)
            return 2
    name = state_args.pop("name", None)
    if name is None:
        print("piagent: name=... is required", file=sys.stderr)
        return 2
    (res,) = run_states([{"id": name, "fun": args.function, "name": name, "args": state_args}],
                        test=args.test, state_dir=args.state_dir)
    if args.json:
        print(json.dumps(res, indent=2, sort_keys=True, default=str))
    else:
        print(f"{res['status']}: {res['fun']} {res['name']}: {res['comment']}")
        for key, value in res["changes"].items():
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            print(f"  {key}: {text}")
    return 1 if res["status"] == FAILED else 0


def _node_id(args, config, state_dir: str) -> str:
    """--id, else the config's id, else the id already enrolled, else the hostname.

    The id is kept in the state dir after first start so that a later hostname change (which a
    state may well make) does not turn the node into a stranger.
    """
    from .config import validate_node_id

    path = os.path.join(state_dir, "node_id")
    chosen = args.id or config.node_id
    if not chosen:
        try:
            with open(path) as fh:
                chosen = fh.read().strip()
        except FileNotFoundError:
            chosen = socket.gethostname().split(".")[0]
    validate_node_id(chosen)
    try:
        with open(path) as fh:
            stored = fh.read().strip()
    except FileNotFoundError:
        stored = ""
    if stored != chosen:
        from .fileio import write_atomic

        write_atomic(path, chosen.encode() + b"\n", 0o644)
    return chosen


def run(args) -> int:
    from . import keys, sd
    from .config import ConfigError, cached_master_fingerprint, load_config, pinned_fingerprint
    from .daemon import Agent, AgentSettings

    log = sd.setup_logging("piagent", args.log_level)
    # States create system files and directories: they get ordinary permissions unless a state
    # asks otherwise, whatever umask the agent was started with. Secrets are written 0600 explicitly.
    os.umask(0o022)
    found = None
    try:
        os.makedirs(args.state_dir, mode=0o700, exist_ok=True)
        if args.config:
            if args.boot_dir:
                raise ConfigError("--boot-dir looks for a config, --config names one: give one of them")
            config = load_config(args.config)
        else:
            from .bootconf import DEFAULT_BOOT_DIRS, discover

            found = discover(args.state_dir, args.boot_dir or DEFAULT_BOOT_DIRS, args.etc_dir)
            config = found.config
        node_id = _node_id(args, config, args.state_dir)
        pinned, pinned_by = pinned_fingerprint(config, args.state_dir)
    except (ConfigError, OSError) as exc:
        print(f"piagent: {exc}", file=sys.stderr)
        return 2
    import zmq

    if not zmq.has("curve"):
        print("piagent: this libzmq was built without CURVE support; install Debian's libzmq5", file=sys.stderr)
        return 2
    public, secret = keys.load_or_create_keypair(args.state_dir, "agent")
    settings = AgentSettings(node_id=node_id, master_host=config.master_host, master_port=config.master_port,
                             state_dir=args.state_dir, public_key=public, secret_key=secret,
                             fingerprint=pinned, fingerprint_source=pinned_by, token=config.token)
    import platform

    import msgpack

    log.info("piagent %s starting as %r, key %s, master %s:%d (python %s, pyzmq %s, libzmq %s, msgpack %s)",
             __version__, node_id, keys.fingerprint(public), config.master_host, config.master_port,
             platform.python_version(), zmq.__version__, zmq.zmq_version(),
             ".".join(map(str, msgpack.version)))
    first_contact = None if pinned else cached_master_fingerprint(args.state_dir)
    if pinned:
        log.info("the master is pinned to %s by %s", pinned, pinned_by)
    elif first_contact:
        log.info("the master is not pinned: trusting %s, the key it presented at first contact "
                 "(see `piagent trust`)", first_contact)

    async def main() -> None:
        on_accepted = None
        if found is not None:
            from .bootconf import forget_token

            def forget_boot_token() -> None:
                forget_token(found)
                # Forgotten in memory too, as after a restart: should the master ever delete this
                # node's key, it waits as pending rather than re-enrolling on a left-over token.
                settings.token = None
            on_accepted = forget_boot_token
        agent = Agent(settings, on_accepted=on_accepted)
        loop = asyncio.get_running_loop()

        def stop() -> None:
            sd.notify("STOPPING=1")  # now, not at exit: ending a running job may take seconds
            agent.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        watchdog = sd.watchdog_interval_s()

        async def keepalive() -> None:
            # Pinged from the event loop itself: if the loop hangs, systemd restarts us.
            while True:
                sd.notify("WATCHDOG=1")
                await asyncio.sleep(watchdog)

        sd.notify("READY=1")
        task = asyncio.ensure_future(keepalive()) if watchdog else None
        try:
            await agent.run()
        finally:
            if task:
                task.cancel()
            log.info("piagent stopped")

    asyncio.run(main())
    return 0


def _read_config_for_trust(args):
    """The config `piagent trust` compares with: --config, else /etc/piagent's if there is one."""
    from .config import ConfigError, load_config

    path = args.config or DEFAULT_CONFIG
    if not args.config and not os.path.exists(path):
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        if args.config:
            raise
        print(f"piagent: note: {exc}; comparing with the state dir only", file=sys.stderr)
        return None


def trust(args) -> int:
    from .bootconf import DEFAULT_MASTER_HOST
    from .config import (MASTER_KEY_CACHE, TRUST_FILE, ConfigError, cached_master_fingerprint,
                         read_trusted_fingerprint, validate_fingerprint, write_trusted_fingerprint)
    from .protocol import DEFAULT_PORT

    state_dir = args.state_dir
    trust_path = os.path.join(state_dir, TRUST_FILE)
    cache_path = os.path.join(state_dir, MASTER_KEY_CACHE)
    try:
        wanted = validate_fingerprint(args.fingerprint) if args.fingerprint is not None else None
        config = _read_config_for_trust(args)
    except ConfigError as exc:
        print(f"piagent: {exc}", file=sys.stderr)
        return 2
    config_fp = config.fingerprint if config else None
    config_path = config.path if config else None
    cached = cached_master_fingerprint(state_dir)

    if wanted is not None:
        if config_fp and config_fp != wanted:
            print(f"piagent: {config_path} pins the master to {config_fp}; pinning {wanted} as well would stop "
                  "the agent from starting (the two must agree). Change the fingerprint in the config instead.",
                  file=sys.stderr)
            return 1
        try:
            write_trusted_fingerprint(state_dir, wanted)
        except OSError as exc:
            print(f"piagent: cannot write {trust_path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        print(f"pinned the master to {wanted} ({trust_path})")
        if cached and cached != wanted:
            print(f"NOTE: this agent has been talking to a master with another key, {cached} (cached in "
                  f"{cache_path}); once restarted it refuses that master.")
        elif cached:
            print("It is the master this agent already talks to.")
        print("Restart the agent to use it: systemctl restart piagent")
        return 0

    try:
        trusted = read_trusted_fingerprint(state_dir)
    except ConfigError as exc:
        print(f"piagent: {exc}", file=sys.stderr)
        return 1
    if config_fp and trusted and config_fp != trusted:
        print(f"CONFLICT: {config_path} pins the master to {config_fp}, `piagent trust` ({trust_path}) to "
              f"{trusted}: the agent refuses to start until they agree.")
        return 1
    if config_fp:
        print(f"pinned by {config_path}: {config_fp}")
        if trusted:
            print(f"  (and by `piagent trust`, {trust_path}: the same)")
    elif trusted:
        print(f"pinned by `piagent trust` ({trust_path}): {trusted}")
    elif cached:
        print(f"trusted on first contact, not pinned: {cached} (cached in {cache_path}).\n"
              "Whoever answered first at the master's address controls this node. If that is what "
              "`pimaster keys fingerprint` prints on the master, pin it: piagent trust FINGERPRINT")
        return 0
    else:
        where = f"{config.master_host}:{config.master_port}" if config else f"{DEFAULT_MASTER_HOST}:{DEFAULT_PORT}"
        print(f"nothing yet: no pin, and no master contacted. The agent will trust the first master key it "
              f"sees at {where}: whoever answers there first gets this node. Pin the master: "
              "piagent trust FINGERPRINT (from `pimaster keys fingerprint` on the master)")
        return 0
    pinned = config_fp or trusted
    if cached and cached != pinned:
        print(f"NOTE: the master last contacted presented {cached}: not the pinned key, so the agent refuses it.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "trust":
        return trust(args)
    if args.command == "fingerprint":
        from .keys import fingerprint

        try:
            with open(os.path.join(args.state_dir, "agent.pub"), "rb") as fh:
                print(fingerprint(fh.read().strip()))
        except OSError as exc:
            print(f"piagent: no key yet in {args.state_dir}: {exc.strerror}", file=sys.stderr)
            return 1
        return 0
    if args.command == "state":
        try:
            return run_single_state(args)
        except BrokenPipeError:  # `piagent state list | head`: the reader left, which is not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.command == "facts":
        from .facts import gather_facts

        print(json.dumps(asyncio.run(gather_facts()), indent=2, sort_keys=True))
        return 0
    return 2
