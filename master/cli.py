"""`pimaster`: the master daemon (`serve`) and the commands people and scripts run against it.

Client commands reach the running master through its control socket (state dir/control.sock).
Imports are kept lean on purpose: `pimaster ping` of 1000 nodes must finish in half a second,
start-up included, so zmq and rich are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .control import ControlClient, ControlError

DEFAULT_STATE_DIR = "/var/lib/pimaster"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parse_duration(text: str) -> float:
    """`90`, `90s`, `30m`, `24h`, `7d` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 24h, 7d)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("a duration must be positive")
    return value


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=os.environ.get("PIMASTER_STATE_DIR", DEFAULT_STATE_DIR),
                        help=f"the master's state directory (default {DEFAULT_STATE_DIR}; env PIMASTER_STATE_DIR)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(prog="pimaster", description="Configuration management for Raspberry Pi clusters.")
    parser.add_argument("--version", action="version", version=f"pimaster {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", parents=[common], help="run the master daemon")
    serve.add_argument("--listen", default="0.0.0.0:4510", help="address and port agents connect to (default 0.0.0.0:4510)")
    serve.add_argument("--key-port", type=int, help="plaintext key-announce port (default: listen port + 1)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--max-pending", type=int, default=256,
                       help="keys that may wait for a person at once; new keys past it are not stored (default 256)")

    token = sub.add_parser("token", help="enrollment tokens").add_subparsers(dest="action", required=True)
    create = token.add_parser("create", parents=[common, as_json], help="create a token and print a piagent.conf")
    create.add_argument("--ttl", type=parse_duration, default=parse_duration("24h"),
                        help="valid for (default 24h, at most 30d)")
    create.add_argument("--uses", type=int, default=1, help="how many nodes it may enroll (default 1)")
    create.add_argument("--address", help="HOST[:PORT] the agents connect to (default: this host's name and port)")
    create.add_argument("--ids", metavar="GLOB", help="enroll only node ids matching GLOB (e.g. 'node*'); default any")
    token.add_parser("list", parents=[common, as_json], help="tokens: id, expiry, uses left, bound ids (never the token)")
    revoke = token.add_parser("revoke", parents=[common, as_json], help="make a token unusable at once")
    revoke.add_argument("token_id", metavar="ID", help="the token's id (from `pimaster token list`)")

    keys = sub.add_parser("keys", help="agent keys: list, accept, reject, delete, fingerprint")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    keys_sub.add_parser("list", parents=[common, as_json], help="all keys with state and fingerprint")
    for name, text in (("accept", "accept a pending key"), ("reject", "reject a key: it gets nothing"),
                       ("delete", "forget a key (the agent may enroll again)")):
        action = keys_sub.add_parser(name, parents=[common, as_json], help=text)
        action.add_argument("node", nargs="?", help="node id (glob allowed)")
        action.add_argument("--fingerprint", help="only the key with this fingerprint")
        action.add_argument("--all", action="store_true", help=f"{name} every matching key")
        if name == "accept":
            action.add_argument("--replace", action="store_true",
                                help="with --fingerprint: accept that denied key (re-flashed Pi) and drop the node's old key")
            action.add_argument("--include-rejected", action="store_true", help="also accept rejected keys")
    fp = keys_sub.add_parser("fingerprint", parents=[common, as_json], help="the master's fingerprint, or a node's")
    fp.add_argument("node", nargs="?")

    ping = sub.add_parser("ping", parents=[common, as_json], help="which nodes are up, and their health")
    ping.add_argument("target", nargs="?", help="glob on the node id (default: all accepted nodes)")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for answers (default 5)")

    apply = sub.add_parser("apply", parents=[common, as_json], help="render a state file for each node, push it, converge",
                           description="Renders FILE (a path, or the name of a shipped state file) for every "
                                       "targeted node, refuses the whole job if any node's rendering fails, "
                                       "then pushes it and shows results as they arrive.")
    apply.add_argument("file", help="state file (path or shipped name, e.g. slurm)")
    apply.add_argument("--target", help="glob on node ids, or role:NAME (from the inventory)")
    apply.add_argument("--test", action="store_true", help="show what would change, change nothing")
    apply.add_argument("--timeout", type=parse_duration, default=parse_duration("1h"),
                       help="how long to wait for results (default 1h); later results are still recorded")
    sub.add_parser("jobs", parents=[common, as_json], help="recent jobs")
    job = sub.add_parser("job", parents=[common, as_json], help="one job's results")
    job.add_argument("job_id")
    sub.add_parser("nodes", parents=[common, as_json], help="enrolled nodes with their facts")
    sub.add_parser("status", parents=[common, as_json], help="the master's own status")
    sub.add_parser("lab", help="a simulated Pi cluster on this machine (see `pimaster lab --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lab"]:
        from .lab import main as lab_main

        return lab_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    client = ControlClient(args.state_dir)
    try:
        handler = COMMANDS[(args.command, getattr(args, "action", None))]
        return handler(client, args)
    except ControlError as exc:
        print(f"pimaster: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pimaster ping | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _serve(args) -> int:
    from piagent.config import ConfigError, parse_address

    from piagent import sd
    from .server import serve

    sd.setup_logging("pimaster", args.log_level)
    try:
        host, port = parse_address(args.listen)
    except ConfigError as exc:
        print(f"pimaster: --listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_pending < 1:
        print("pimaster: --max-pending must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    return serve(args.state_dir, host, port, args.key_port, args.max_pending)


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


Cell = "str | tuple[str, str]"  # text, or (text, rich style)


def _table(title: str | None, columns: list[str], rows: list[list]) -> None:
    """Aligned columns through rich (colour only on a terminal).

    Built as one rich Text rather than a rich Table: a Table lays out 1000 rows in ~0.5 s, which
    would be most of `pimaster ping`'s budget on a large cluster; this takes ~20 ms.
    """
    from rich.console import Console
    from rich.text import Text

    cells = [[c if isinstance(c, tuple) else (str(c), "") for c in row] for row in rows]
    widths = [max([len(name)] + [len(row[i][0]) for row in cells]) for i, name in enumerate(columns)]
    text = Text()
    if title:
        text.append(title + "\n", style="bold")
    text.append("  ".join(name.ljust(widths[i]) for i, name in enumerate(columns)).rstrip(), style="bold")
    for row in cells:
        text.append("\n")
        for i, (value, style) in enumerate(row):
            last = i == len(row) - 1
            text.append(value if last else value.ljust(widths[i]), style=style or None)
            if not last:
                text.append("  ")
    # soft_wrap: long lines are never folded (people compare fingerprints), the terminal wraps them.
    Console(soft_wrap=True, highlight=False).print(text)


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    delta = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{rest // 60:02d}m"


def _ping_note(node: dict) -> str | tuple[str, str]:
    rollback = node.get("network_rollback")
    if not isinstance(rollback, dict):
        return ""
    moved = ", ".join(f"{c.get('interface')} {c.get('address')}" for c in rollback.get("changes", []))
    return (f"network change ({moved}) rolled back {_ago(rollback.get('time'))}: {rollback.get('reason', '')}", "yellow")


# ---------------------------------------------------------------------------------------------
def cmd_ping(client: ControlClient, args) -> int:
    result = client.call("ping", target=args.target, timeout=args.timeout, timeout_extra=args.timeout + 10)
    nodes = result["nodes"]
    if args.json:
        _print_json({"nodes": nodes})
    elif nodes:
        rows = []
        for n in nodes:
            if not n["ok"]:
                rows.append([n["id"], ("down", "red"), "-", "-", "-", "-", "-", "-", "-", (n.get("error", ""), "red")])
                continue
            flags = ",".join(n.get("throttled_flags", [])) or ("ok" if "throttled" in n else "-")
            rows.append([
                n["id"], ("up", "green"), f"{n['rtt_ms']:.1f} ms", _duration(n.get("uptime_s")),
                " ".join(f"{x:.2f}" for x in n.get("load", [])[:1]) or "-",
                f"{n['temp_c']:.1f}°C" if "temp_c" in n else "-", flags,
                f"{n['clock_offset_ms']:+.1f} ms" if "clock_offset_ms" in n else "-",
                f"{n['disk_root_used_pct']:.0f}%" if "disk_root_used_pct" in n else "-", _ping_note(n)])
        _table(None, ["NODE", "STATE", "RTT", "UPTIME", "LOAD", "TEMP", "THROTTLING", "CLOCK", "DISK /", "NOTE"], rows)
        down = sum(1 for n in nodes if not n["ok"])
        print(f"{len(nodes) - down} up, {down} down")
    if not nodes:
        print(f"pimaster: no accepted node matches {args.target or '*'}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(n["ok"] for n in nodes) else EXIT_FAILED


def cmd_nodes(client: ControlClient, args) -> int:
    nodes = client.call("nodes")["nodes"]
    if args.json:
        _print_json({"nodes": nodes})
        return EXIT_OK
    rows = []
    for n in nodes:
        f = n["facts"]
        model = f.get("pi_model") or f.get("machine", "-")
        os_name = f.get("os", {}).get("PRETTY_NAME", "-")
        rows.append([n["id"], f.get("hostname", "-"), ", ".join(f.get("ips", [])[:2]) or "-", model,
                     f.get("arch", "-"), os_name, "yes" if n["connected"] else "no", _ago(n["last_seen"])])
    _table(None, ["NODE", "HOSTNAME", "IP", "MODEL", "ARCH", "OS", "CONNECTED", "LAST SEEN"], rows)
    return EXIT_OK


def cmd_status(client: ControlClient, args) -> int:
    status = client.call("status")
    if args.json:
        _print_json(status)
    else:
        for key in sorted(status):
            print(f"{key}: {status[key]}")
    return EXIT_OK


def cmd_keys_list(client: ControlClient, args) -> int:
    result = client.call("keys.list")
    if args.json:
        _print_json(result)
        return EXIT_OK
    colour = {"accepted": "green", "pending": "yellow", "rejected": "red", "denied": "magenta"}
    rows = [[k["id"], (k["state"], colour[k["state"]]), k["fingerprint"],
             ", ".join(k["ips"][:2]) or "-", _ago(k["created"])] for k in result["keys"]]
    _table(f"master {result['master']}", ["NODE", "STATE", "FINGERPRINT", "IP", "FIRST SEEN"], rows)
    for key in sorted((k for k in result["keys"] if k["state"] == "denied"), key=lambda k: k["id"]):
        node = key["id"]
        print(f"{node}: a second key claims this id (re-flashed Pi?). Compare the fingerprint with "
              f"`piagent fingerprint` on the node, then `pimaster keys accept --replace {node} --fingerprint "
              f"{key['fingerprint']}` or `pimaster keys reject {node} --fingerprint {key['fingerprint']}`.")
    return EXIT_OK


def _keys_action(name: str):
    def command(client: ControlClient, args) -> int:
        params = {"node": args.node, "fingerprint": args.fingerprint, "all": args.all}
        if name == "accept":
            params.update(replace=args.replace, include_rejected=args.include_rejected)
        result = client.call(f"keys.{name}", **params)
        if args.json:
            _print_json(result)
        else:
            past = {"accept": "accepted", "reject": "rejected", "delete": "deleted"}[name]
            for key in result[past]:
                print(f"{past} {key['id']} {key['fingerprint']}")
        return EXIT_OK
    return command


def cmd_keys_fingerprint(client: ControlClient, args) -> int:
    if not args.node:
        try:  # the master's own key is readable without a running master
            from piagent.keys import fingerprint

            with open(os.path.join(args.state_dir, "master.pub"), "rb") as fh:
                result = {"master": fingerprint(fh.read().strip())}
        except OSError:
            result = client.call("keys.fingerprint")
    else:
        result = client.call("keys.fingerprint", node=args.node)
    if args.json:
        _print_json(result)
    elif "master" in result:
        print(result["master"])
    else:
        for key in result["keys"]:
            print(f"{key['id']} {key['state']} {key['fingerprint']}")
    return EXIT_OK


def cmd_token_create(client: ControlClient, args) -> int:
    result = client.call("token.create", ttl_s=args.ttl, uses=args.uses, address=args.address, ids=args.ids)
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(result["config"])
    return EXIT_OK


def cmd_token_list(client: ControlClient, args) -> int:
    tokens = client.call("token.list")["tokens"]
    if args.json:
        _print_json({"tokens": tokens})
        return EXIT_OK
    now = time.time()
    rows = []
    for t in tokens:
        expired = t["expires"] < now
        left = _duration(t["expires"] - now) if not expired else "expired"
        rows.append([t["id"], _ago(t["created"]), (left, "red" if expired else ""),
                     (f"{t['uses_left']}/{t['uses_total']}", "red" if t["uses_left"] <= 0 else ""),
                     t["ids"] or "*", t["address"]])
    _table(None, ["ID", "CREATED", "EXPIRES IN", "USES LEFT", "IDS", "ADDRESS"], rows)
    return EXIT_OK


def cmd_token_revoke(client: ControlClient, args) -> int:
    result = client.call("token.revoke", token_id=args.token_id)
    if args.json:
        _print_json(result)
    else:
        print(f"revoked {result['revoked']}")
    return EXIT_OK


def cmd_apply(client: ControlClient, args) -> int:
    from .apply_view import LiveApply, PlainApply, print_report

    if args.json:
        view = PlainApply()
        view.event = lambda event: None
    elif sys.stdout.isatty():
        from rich.console import Console

        view = LiveApply(Console())
    else:
        view = PlainApply()
    with view:
        report = client.call("apply", file=args.file, target=args.target, test=args.test, timeout=args.timeout,
                             cwd=os.getcwd(), timeout_extra=args.timeout + 120, on_event=view.event)
    if args.json:
        _print_json(report)
        return EXIT_OK if all(n["ok"] for n in report["nodes"].values()) else EXIT_FAILED
    return EXIT_OK if print_report(report, _table) else EXIT_FAILED


def cmd_jobs(client: ControlClient, args) -> int:
    from .apply_view import ago

    jobs = client.call("jobs")["jobs"]
    if args.json:
        _print_json({"jobs": jobs})
        return EXIT_OK
    rows = [[j["id"], ago(j["created"]), j["file"], j["target"] or "*", "test" if j["test"] else "",
             f"{j['ok_nodes'] or 0}/{j['nodes']} ok", f"{j['finished_nodes'] or 0}/{j['nodes']} finished"] for j in jobs]
    _table(None, ["JOB", "STARTED", "FILE", "TARGET", "MODE", "RESULT", "PROGRESS"], rows)
    return EXIT_OK


def cmd_job(client: ControlClient, args) -> int:
    from .apply_view import print_report

    report = client.call("job", job_id=args.job_id)
    if args.json:
        _print_json(report)
        return EXIT_OK if all(n["ok"] for n in report["nodes"].values()) else EXIT_FAILED
    return EXIT_OK if print_report(report, _table) else EXIT_FAILED


COMMANDS = {
    ("apply", None): cmd_apply,
    ("jobs", None): cmd_jobs,
    ("job", None): cmd_job,
    ("ping", None): cmd_ping,
    ("nodes", None): cmd_nodes,
    ("status", None): cmd_status,
    ("keys", "list"): cmd_keys_list,
    ("keys", "accept"): _keys_action("accept"),
    ("keys", "reject"): _keys_action("reject"),
    ("keys", "delete"): _keys_action("delete"),
    ("keys", "fingerprint"): cmd_keys_fingerprint,
    ("token", "create"): cmd_token_create,
    ("token", "list"): cmd_token_list,
    ("token", "revoke"): cmd_token_revoke,
}
