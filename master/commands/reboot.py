"""`pimaster reboot TARGET`: a rolling reboot, `--batch` nodes at a time, each batch back from a new
boot before the next starts; `pimaster shutdown TARGET`: power nodes off, for pulling the plug.
The order, the waiting and the master's own node: `pimaster.reboots`.

`reboot` does not ask first: it is rolling (N nodes down at a time), every node comes back by
itself, and the roll stops at the first node that does not (as `salt '*' system.reboot` and
Ansible's reboot module do not ask). `shutdown` asks on a terminal, and needs `--yes` elsewhere:
a powered-off Pi stays off until someone pulls its plug or presses its button.

TARGET is required (`'*'` for every node): a forgotten one must not mean the whole cluster.

`--json` (both): {"action": "reboot"|"poweroff", "ok", "order": [ids in the order acted on],
"master_node": ID|null, "stopped": why the roll stopped|null, "elapsed_s", "skipped": {ID: why},
"nodes": {ID: {"ok", "state", "after_s", "boot_id", "boot_init", "boot", "error"}}}; a node's
state: back, rebooting (not waited for: --no-wait, or the master's own node), off, powering_off,
down (not back yet), not_back, still_up, failed, not_started. The same steps are `reboot` events
(`pimaster.reboots`; `pimaster events` shows them).
"""

from __future__ import annotations

import argparse
import re
import sys

from . import handler
from ..cli import (EXIT_FAILED, EXIT_OK, TARGET_HELP, Duration, parse_duration, parse_target, print_json,
                   report_error, table)
from ..errors import ControlError

MAX_TIMEOUT_S = 24 * 3600
MAX_CHOSEN = 100_000
# Skipped nodes of one reason listed one a line up to this many; past it, one line for them all.
MAX_SKIPPED_LINES = 3
MAX_SKIPPED_NAMED = 5
ACTIONS = {"reboot": "reboot", "shutdown": "poweroff"}
STATE_STYLE = {"back": "green", "off": "green", "rebooting": "yellow", "powering_off": "yellow",
               "skipped": "dim", "not_started": "dim"}


def add_parser(sub, name, summary, common, as_json) -> None:
    from ..targets import parse_batch

    if name == "reboot":
        parser = sub.add_parser(name, parents=[common, as_json], help=summary,
                                usage="pimaster reboot [options] TARGET",
                                description="Reboots the nodes in TARGET, --batch at a time: each batch is back "
                                            "(its agents answer from a new boot) before the next starts; a node "
                                            "not back within --timeout stops the roll. The master's own node "
                                            "goes last. Each step is also a `reboot` event (pimaster events).")
        _add_target(parser, "reboot")
        parser.add_argument("--batch", type=parse_batch, metavar="N|N%",
                            help="nodes rebooted at a time: a number, or a share of the targeted nodes "
                                 "(default: all at once)")
        parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                            help="wait for each batch to come back (default); --no-wait asks every node at "
                                 "once and returns")
        parser.add_argument("--only-required", action="store_true",
                            help="only the nodes that an apply reported `reboot_required` for and that have "
                                 "not booted since")
        timeout_help = "how long each node may take to come back from a new boot; default 10m"
    else:
        parser = sub.add_parser(name, parents=[common, as_json], help=summary,
                                usage="pimaster shutdown [options] TARGET",
                                description="Powers the nodes in TARGET off, all at once (the master's own node "
                                            "last), for pulling the plug safely. They stay off until powered on.")
        _add_target(parser, "power off")
        parser.add_argument("--yes", "-y", action="store_true",
                            help="do not ask first (needed when not on a terminal)")
        timeout_help = "how long each node may take to go off; default 10m"
    parser.add_argument("--timeout", type=Duration(maximum=MAX_TIMEOUT_S), default=parse_duration("10m"),
                        metavar="DURATION", help=timeout_help)
    parser.set_defaults(run=run_reboot if name == "reboot" else run_shutdown)


def _add_target(parser, verb: str) -> None:
    """TARGET, required: a command that takes nodes down names them (a forgotten one must not mean
    the whole cluster); `'*'` says every node."""
    from ..targets import fact_names

    # The syntax every target has, less the default these commands do not have.
    syntax = re.sub(r";\s*default every accepted node", "",
                    TARGET_HELP.format(inventory="the cluster.yaml the last apply read", facts=fact_names()))
    syntax = syntax.removeprefix("the nodes: ")
    parser.add_argument("target", metavar="TARGET", type=parse_target,
                        help=f"the nodes to {verb} (required): '*' for every node, the master's own node last; "
                             f"{syntax}")


def _print_event(event: dict) -> None:
    kind = event.get("type")
    if kind == "note":
        print(f"note: {event.get('message')}", flush=True)
    elif kind == "batch":
        print(f"batch {event.get('index')}/{event.get('of')}: {', '.join(event.get('nodes') or [])}", flush=True)
    elif kind == "skipped":
        for line in skipped_lines(event.get("nodes") or {}):
            print(line, flush=True)
    elif kind == "node":
        print(f"{event.get('node')}: {_state_text(event)}", flush=True)


def skipped_lines(skipped: dict[str, str]) -> list[str]:
    """The skipped nodes, each once: a line per node, or one line per reason for many of them."""
    reasons: dict[str, list[str]] = {}
    for node, why in skipped.items():
        reasons.setdefault(str(why), []).append(str(node))
    lines = []
    for why, nodes in reasons.items():
        if len(nodes) <= MAX_SKIPPED_LINES:
            lines += [f"{node}: skipped: {why}" for node in nodes]
        else:
            named = ", ".join(nodes[:MAX_SKIPPED_NAMED])
            lines.append(f"skipped {len(nodes)} nodes: {why} ({named} and {len(nodes) - MAX_SKIPPED_NAMED} more)")
    return lines


def _seconds(value) -> str:
    return f"{value:.1f} s" if value < 60 else f"{int(value // 60)} min {value % 60:.0f} s"


def _state_text(row: dict) -> str:
    state = row.get("state")
    after = f" after {_seconds(row['after_s'])}" if row.get("after_s") is not None else ""
    if state == "back":
        return f"back{after} (new boot {row.get('boot')})"
    if state == "down":
        return f"down{after}"
    if state == "off":
        return f"off{after}"
    if state == "powering_off":
        return "powering off"
    error = f": {row['error']}" if row.get("error") else ""
    return f"{str(state).replace('_', ' ')}{error}"


def _run(client, args, action: str, **params) -> int:
    on_event = None if args.json else _print_event
    report = client.call(action, target=args.target, timeout=args.timeout,
                         timeout_extra=args.timeout + 60, on_event=on_event, **params)
    if args.json:
        print_json(report)
    else:
        rows = []
        for node in report["order"]:
            row = report["nodes"].get(node, {})
            detail = row.get("error", "")
            if node == report.get("master_node") and row.get("state") in ("rebooting", "powering_off"):
                detail = "this master's node: not waited for"
            rows.append([node, (row.get("state", "-"), STATE_STYLE.get(row.get("state"), "red")),
                         _seconds(row["after_s"]) if row.get("after_s") is not None else "-",
                         row.get("boot", "-"), detail])
        if rows:
            table(None, ["NODE", "RESULT", "AFTER", "BOOT", "DETAIL"], rows)
        if report.get("stopped"):
            print(f"stopped: {report['stopped']}", file=sys.stderr)
    return EXIT_OK if report["ok"] else EXIT_FAILED


def run_reboot(client, args) -> int:
    if args.batch and not args.wait:
        return report_error(args, "--batch needs --wait: without waiting, every node is asked at once")
    return _run(client, args, "reboot", batch=args.batch, wait=args.wait, only_required=args.only_required)


def run_shutdown(client, args) -> int:
    params: dict = {}
    if not args.yes:
        planned = client.call("shutdown", target=args.target, dry_run=True)
        nodes = planned["nodes"]
        if nodes:
            refused = _confirm(nodes, planned.get("master_node"), args)
            if refused is not None:
                return refused
        params["nodes"] = nodes
    return _run(client, args, "shutdown", **params)


def _confirm(nodes: list[str], master_node: str | None, args) -> int | None:
    """Asks a person on a terminal before powering nodes off; elsewhere --yes says it. None to go
    ahead, or the exit status (nothing was done)."""
    listing = ", ".join(nodes[:20]) + (f" and {len(nodes) - 20} more" if len(nodes) > 20 else "")
    count = f"{len(nodes)} node" + ("s" if len(nodes) != 1 else "")
    them = "them" if len(nodes) != 1 else "it"
    own = f" ({master_node} runs this master: it goes last, and this master with it)" if master_node else ""
    try:
        on_terminal = sys.stdin.isatty()
    except ValueError:  # stdin closed
        on_terminal = False
    if not on_terminal:
        return report_error(args, f"this would power off {count} ({listing}){own}; not on a terminal "
                                  f"to ask: add --yes to power {them} off", "confirmation_needed", nodes=nodes)
    sys.stderr.write(f"Power off {count}: {listing}{own}? {'They stay' if len(nodes) != 1 else 'It stays'} off "
                     "until powered on. [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        return report_error(args, "nothing powered off", "declined")
    return None


def _checked(target, timeout, wait, only_required, nodes) -> tuple[float, list[str] | None]:
    """The arguments a control request carried (from any client: checked again)."""
    if target is None:  # a forgotten target must not mean the whole cluster, whoever asks
        raise ControlError("which nodes? a target is required ('*' for every node)", code="usage")
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ControlError(f"--timeout must be between 0 and {MAX_TIMEOUT_S} seconds")
    if not isinstance(wait, bool) or not isinstance(only_required, bool):
        raise ControlError("wait and only_required are true or false")
    if nodes is not None and (not isinstance(nodes, list) or len(nodes) > MAX_CHOSEN
                              or not all(isinstance(n, str) for n in nodes)):
        raise ControlError("nodes: a list of node ids")
    return float(timeout), nodes


@handler("reboot", streaming=True)
async def handle_reboot(master, emit, target: str | None = None, batch=None, wait: bool = True,
                        timeout: float = 600.0, only_required: bool = False) -> dict:
    from ..reboots import roll
    from ..targets import checked_batch

    timeout, _ = _checked(target, timeout, wait, only_required, None)
    batch = checked_batch(batch)
    if batch and not wait:
        raise ControlError("--batch needs --wait: without waiting, every node is asked at once", code="usage")
    return await roll(master, emit, target, "reboot", batch, wait, timeout, only_required)


@handler("shutdown", streaming=True)
async def handle_shutdown(master, emit, target: str | None = None, timeout: float = 600.0,
                          dry_run: bool = False, nodes: list[str] | None = None) -> dict:
    from ..reboots import plan, roll

    timeout, chosen = _checked(target, timeout, True, False, nodes)
    if dry_run is True:
        planned = await plan(master, target, "poweroff")
        return {"nodes": planned["nodes"], "master_node": planned["master_node"], "skipped": planned["skipped"]}
    return await roll(master, emit, target, "poweroff", None, True, timeout, chosen=chosen)
