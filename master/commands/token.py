"""`pimaster token create|list|revoke`: enrollment tokens (only a hash is stored; bound ids, expiry,
uses). `create` prints a piagent.conf for the SD cards' boot partitions."""

from __future__ import annotations

import re
import sys
import time

from . import handler
from ..cli import EXIT_OK, Duration, ago, duration, parse_duration, print_json, table
from ..errors import ControlError

# The longest a token may live (`token create --ttl`): a leaked piagent.conf expires.
MAX_TOKEN_TTL_S = 30 * 86400
# `token create --ids`: one glob over what node ids may hold (a comma list would match nothing).
TOKEN_IDS_RE = re.compile(r"[A-Za-z0-9._*?\[\]!-]{1,128}")


def add_parser(sub, name, summary, common, as_json) -> None:
    token = sub.add_parser(name, help=summary).add_subparsers(dest="action", required=True)
    create = token.add_parser("create", parents=[common, as_json], help="create a token and print a piagent.conf")
    create.add_argument("--ttl", type=Duration(maximum=MAX_TOKEN_TTL_S), default=parse_duration("24h"),
                        help="valid for: seconds, or 30m, 24h, 7d (default 24h, at most 30d)")
    create.add_argument("--uses", type=int, default=1, help="how many nodes it may enroll (default 1)")
    create.add_argument("--address", help="HOST[:PORT] the agents connect to (default: the address the "
                                           "master listens on, or this host's name when it listens on all)")
    create.add_argument("--ids", metavar="GLOB", help="enroll only node ids matching GLOB (e.g. 'node*'); default any")
    create.set_defaults(run=run_create)
    token.add_parser("list", parents=[common, as_json],
                     help="tokens: id, expiry, uses left, bound ids (never the token)").set_defaults(run=run_list)
    revoke = token.add_parser("revoke", parents=[common, as_json], help="make a token unusable at once")
    revoke.add_argument("token_id", metavar="ID", help="the token's id (from `pimaster token list`)")
    revoke.set_defaults(run=run_revoke)


def run_create(client, args) -> int:
    result = client.call("token.create", ttl_s=args.ttl, uses=args.uses, address=args.address, ids=args.ids)
    if args.json:
        print_json(result)
    else:
        sys.stdout.write(result["config"])
    return EXIT_OK


def run_list(client, args) -> int:
    tokens = client.call("token.list")["tokens"]
    if args.json:
        print_json({"tokens": tokens})
        return EXIT_OK
    now = time.time()
    rows = []
    for t in tokens:
        expired = t["expires"] < now
        left = duration(t["expires"] - now) if not expired else "expired"
        rows.append([t["id"], ago(t["created"]), (left, "red" if expired else ""),
                     (f"{t['uses_left']}/{t['uses_total']}", "red" if t["uses_left"] <= 0 else ""),
                     t["ids"] or "*", t["address"]])
    table(None, ["ID", "CREATED", "EXPIRES IN", "USES LEFT", "IDS", "ADDRESS"], rows)
    return EXIT_OK


def run_revoke(client, args) -> int:
    result = client.call("token.revoke", token_id=args.token_id)
    if args.json:
        print_json(result)
    else:
        print(f"revoked {result['revoked']}")
    return EXIT_OK


@handler("token.create")
async def handle_create(master, ttl_s: float = 86400, uses: int = 1, address: str | None = None,
                        ids: str | None = None) -> dict:
    import logging
    import secrets
    import socket

    from piagent import config as pconfig

    ttl_s, uses = float(ttl_s), int(uses)
    if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
        raise ControlError(f"--ttl must be between 1 second and {MAX_TOKEN_TTL_S // 86400} days")
    if not 0 < uses <= 100000:
        raise ControlError("--uses must be between 1 and 100000")
    if ids is not None and (not isinstance(ids, str) or not TOKEN_IDS_RE.fullmatch(ids)):
        raise ControlError("--ids takes one glob on node ids, e.g. 'node*' or 'node0[1-4]' (node ids are "
                           "letters, digits, '.', '_' and '-')")
    if address:
        try:
            host, port = pconfig.parse_address(address, master.port)
        except pconfig.ConfigError as exc:
            raise ControlError(str(exc)) from None
    elif master.listen_host and master.listen_host not in ("0.0.0.0", "::", "*"):
        # Listening on one address only (127.0.0.1 on a test master): that address is the one
        # agents can reach, not this host's name (which may resolve to another).
        host, port = master.listen_host.strip("[]"), master.port
    else:
        host, port = socket.gethostname(), master.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    token = secrets.token_urlsafe(24)
    record = master.store.add_token(token, ttl_s, uses, where, ids)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record["expires"]))
    bound = f" with ids matching {ids}" if ids else ""
    config = pconfig.render_config(where, master.fingerprint, token, comment=(
        "piagent.conf: put this file on each SD card's boot partition.\n"
        f"The token enrolls up to {uses} node(s){bound} until {stamp}; keep it secret.\n"
        f"Its id is {record['id']} (pimaster token list, pimaster token revoke {record['id']})."))
    logging.getLogger("pimaster").info("enrollment token %s created: %d use(s)%s, expires %s",
                                       record["id"], uses, bound, stamp)
    return {"config": config, "address": where, "token": token, "fingerprint": master.fingerprint,
            "expires": record["expires"], "uses": uses, "id": record["id"], "ids": ids}


@handler("token.list")
async def handle_list(master) -> dict:
    return {"tokens": master.store.tokens()}


@handler("token.revoke")
async def handle_revoke(master, token_id: str) -> dict:
    import logging

    if not isinstance(token_id, str) or not master.store.revoke_token(token_id):
        raise ControlError(f"no token {str(token_id)[:40]!r} (see `pimaster token list`)")
    logging.getLogger("pimaster").info("enrollment token %s revoked", token_id)
    return {"revoked": token_id}
