"""`pimaster keys list|accept|reject|delete|fingerprint`: the agents' keys. The policy (what may be
accepted, replaced, rejected or deleted) is `pimaster.enrollment`'s; this is its command line."""

from __future__ import annotations

import os
import sys

from . import handler
from ..cli import EXIT_OK, ago, print_json, report_error, table
from ..errors import ControlError

ACTIONS = (("accept", "accept a pending key"), ("reject", "reject a key: it gets nothing"),
           ("delete", "forget a key (the agent may enroll again)"))
PAST = {"accept": "accepted", "reject": "rejected", "delete": "deleted"}


def add_parser(sub, name, summary, common, as_json) -> None:
    keys_sub = sub.add_parser(name, help=summary).add_subparsers(dest="action", required=True)
    keys_sub.add_parser("list", parents=[common, as_json], help="all keys with state and fingerprint").set_defaults(run=run_list)
    for action_name, text in ACTIONS:
        action = keys_sub.add_parser(action_name, parents=[common, as_json], help=text)
        action.add_argument("node", nargs="?", help="node id (glob allowed)")
        action.add_argument("--fingerprint", help="only the key with this fingerprint")
        action.add_argument("--all", action="store_true", help=f"{action_name} every matching key")
        action.add_argument("--yes", "-y", action="store_true",
                            help=f"{action_name} more than one key without asking (needed when not on a terminal)")
        if action_name == "accept":
            action.add_argument("--replace", action="store_true",
                                help="with --fingerprint: accept that denied key (re-flashed Pi) and drop the node's old key")
            action.add_argument("--include-rejected", action="store_true", help="also accept rejected keys")
        action.set_defaults(run=_run_action(action_name))
    fp = keys_sub.add_parser("fingerprint", parents=[common, as_json], help="the master's fingerprint, or a node's")
    fp.add_argument("node", nargs="?", help="a node id: its accepted key's fingerprint (default: the master's own)")
    fp.set_defaults(run=run_fingerprint)


def run_list(client, args) -> int:
    result = client.call("keys.list")
    if args.json:
        print_json(result)
        return EXIT_OK
    colour = {"accepted": "green", "pending": "yellow", "rejected": "red", "denied": "magenta"}
    rows = [[k["id"], (k["state"], colour[k["state"]]), k["fingerprint"],
             ", ".join(k["ips"][:2]) or "-", ago(k["created"])] for k in result["keys"]]
    table(f"master {result['master']}", ["NODE", "STATE", "FINGERPRINT", "IP", "FIRST SEEN"], rows)
    for key in sorted((k for k in result["keys"] if k["state"] == "denied"), key=lambda k: k["id"]):
        node = key["id"]
        print(f"{node}: a second key claims this id (re-flashed Pi?). Compare the fingerprint with "
              f"`piagent fingerprint` on the node, then `pimaster keys accept --replace {node} --fingerprint "
              f"{key['fingerprint']}` or `pimaster keys reject {node} --fingerprint {key['fingerprint']}`.")
    return EXIT_OK


def _run_action(name: str):
    def run(client, args) -> int:
        params = {"node": args.node, "fingerprint": args.fingerprint, "all": args.all}
        if name == "accept":
            params.update(replace=args.replace, include_rejected=args.include_rejected)
        if not args.yes:
            # Ask the master which keys match, show them if more than one, then act on exactly
            # those: a key that comes between the question and the answer is not taken unseen.
            keys = client.call(f"keys.{name}", **params, dry_run=True)["keys"]
            if len(keys) > 1:
                refused = _confirm(name, keys, args)
                if refused is not None:
                    return refused
            params["fingerprints"] = [k["fingerprint"] for k in keys]
        result = client.call(f"keys.{name}", **params)
        if args.json:
            print_json(result)
        else:
            for key in result[PAST[name]]:
                print(f"{PAST[name]} {key['id']} {key['fingerprint']}")
        return EXIT_OK
    return run


def _confirm(name: str, keys: list[dict], args) -> int | None:
    """Asks a person on a terminal before acting on several keys (salt-key's habit); elsewhere
    --yes says it. None to go ahead, or the exit status (nothing was done)."""
    widths = [max(len(k[field]) for k in keys) for field in ("id", "state")]
    listing = "".join(f"  {k['id'].ljust(widths[0])}  {k['state'].ljust(widths[1])}  {k['fingerprint']}\n"
                      for k in keys)
    try:
        on_terminal = sys.stdin.isatty()
    except ValueError:  # stdin closed
        on_terminal = False
    if not on_terminal:
        ids = ", ".join(k["id"] for k in keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        message = f"this would {name} {len(keys)} keys ({ids}); not on a terminal to ask: add --yes to {name} them"
        return report_error(args, message, "confirmation_needed", keys=keys,
                            text=f"pimaster: this would {name} {len(keys)} keys:\n{listing}"
                                 f"pimaster: not on a terminal to ask: add --yes to {name} them\n")
    sys.stderr.write(f"{name.capitalize()} these {len(keys)} keys?\n{listing}[y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        return report_error(args, f"no key {PAST[name]}", "declined")
    return None


def run_fingerprint(client, args) -> int:
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
        print_json(result)
    elif "master" in result:
        print(result["master"])
    else:
        for key in result["keys"]:
            print(f"{key['id']} {key['state']} {key['fingerprint']}")
    return EXIT_OK


@handler("keys.list")
async def handle_list(master) -> dict:
    keys = []
    for key in master.store.keys():
        facts = key["facts"]
        keys.append({"id": key["node_id"], "state": key["state"], "fingerprint": key["fingerprint"],
                     "created": key["created"], "updated": key["updated"],
                     "hostname": facts.get("hostname"), "ips": facts.get("ips", []),
                     "connected": master.roster.key_connected(key["public_key"])})
    return {"master": master.fingerprint, "keys": keys}


def _shown(fingerprints) -> set[str] | None:
    """The fingerprints of the keys a person was shown (a list of them), or None for any."""
    if fingerprints is None:
        return None
    if not isinstance(fingerprints, list) or not all(isinstance(f, str) for f in fingerprints):
        raise ControlError("fingerprints: expected a list of fingerprints")
    return set(fingerprints)


# Each action: with `dry_run`, {"keys": [{id, fingerprint, state}]} it would take, taking none;
# with `fingerprints`, only the matching keys that have one of them (the keys a person confirmed).
@handler("keys.accept")
async def handle_accept(master, node: str | None = None, fingerprint: str | None = None,
                        replace: bool = False, include_rejected: bool = False, all: bool = False,
                        dry_run: bool = False, fingerprints: list[str] | None = None) -> dict:
    keys = master.enrollment.accept_keys(node, fingerprint, replace, include_rejected, all,
                                         dry_run=bool(dry_run), only=_shown(fingerprints))
    return {"keys": keys} if dry_run else {"accepted": keys}


@handler("keys.reject")
async def handle_reject(master, node: str | None = None, fingerprint: str | None = None,
                        all: bool = False, dry_run: bool = False, fingerprints: list[str] | None = None) -> dict:
    keys = master.enrollment.reject_keys(node, fingerprint, all, dry_run=bool(dry_run), only=_shown(fingerprints))
    return {"keys": keys} if dry_run else {"rejected": keys}


@handler("keys.delete")
async def handle_delete(master, node: str | None = None, fingerprint: str | None = None,
                        all: bool = False, dry_run: bool = False, fingerprints: list[str] | None = None) -> dict:
    keys = master.enrollment.delete_keys(node, fingerprint, all, dry_run=bool(dry_run), only=_shown(fingerprints))
    return {"keys": keys} if dry_run else {"deleted": keys}


@handler("keys.fingerprint")
async def handle_fingerprint(master, node: str | None = None) -> dict:
    if not node:
        return {"master": master.fingerprint}
    keys = master.store.keys(node)
    if not keys:
        raise ControlError(f"no key for {node}")
    return {"keys": [{"id": k["node_id"], "state": k["state"], "fingerprint": k["fingerprint"]} for k in keys]}
