"""`pimaster events [--json]`: what happens in the master, live: keys pending and accepted, nodes up
and down (and why), jobs started and each node's result, network rollbacks, reboot progress.

One line per event: with --json the event itself (`pimaster.events` documents its fields), otherwise
its time, type, node and what happened, for a person or a `grep`. The stream has no end of its own:
Ctrl-C, SIGTERM or the reader of a pipe going away end it, with exit status 0. When the master
stops, the stream ends with exit status 3 (as when it cannot be reached).
"""

from __future__ import annotations

import json
import os
import re
import sys

from . import handler
from ..cli import EXIT_OK, EXIT_UNREACHABLE, local_time

# SIGTERM, or this command's reader gone (`_watch_stdout` sends one): the end of the stream, as Ctrl-C is.
from .apply import Terminated as Stopped, _terminated as _stop  # noqa: E402


def add_parser(sub, name, summary, common, as_json) -> None:
    events = sub.add_parser(name, parents=[common, as_json], help=summary,
                            description="Streams what happens in the master as it happens: key pending/accepted/"
                                        "rejected/deleted, node up/down with the reason, job started and each "
                                        "node's result, network rollbacks, reboot progress. One line per event "
                                        "(--json: one JSON object per line). Runs until Ctrl-C, SIGTERM or the "
                                        "end of the pipe it writes to.")
    events.set_defaults(run=run)


def run(client, args) -> int:
    import signal

    def show(event: dict) -> None:
        try:
            print(_json_line(event) if args.json else text_line(event), flush=True)
        except BrokenPipeError:  # the reader went away (`pimaster events | head`)
            raise Stopped from None

    signal.signal(signal.SIGTERM, _stop)
    _watch_stdout()
    try:
        result = client.call("events", timeout_extra=None, on_event=show)
    except KeyboardInterrupt:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        # Whatever is left unwritten for a reader that went away must not fail the exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    why = result.get("ended") if isinstance(result, dict) else None
    print(f"pimaster: the event stream ended: {why or 'the master ended it'}", file=sys.stderr, flush=True)
    return EXIT_UNREACHABLE


def _json_line(event: dict) -> str:
    return json.dumps(event, sort_keys=True)


def _watch_stdout() -> None:
    """When stdout is a pipe or a socket, end the stream as soon as its reader goes (not only at the
    next event, which may be hours away): `pimaster events | grep -m1 down` returns when grep does."""
    import select
    import signal
    import stat
    import threading

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError):
        return
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return

    def watch() -> None:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # poll reports POLLERR and POLLHUP whatever is asked
        while True:
            if any(flags & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, flags in poller.poll()):
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="stdout-watch", daemon=True).start()


def text_line(event: dict) -> str:
    """One event as a person reads it: `TIME  TYPE  NODE  what happened` (one line whatever it holds)."""
    kind = str(event.get("type"))
    node = event.get("node") or "-"
    words = _TEXT.get(kind, _fields)(event)
    line = f"{local_time(event.get('time'))}  {kind:<16} {node:<16} {words}"
    return line.replace("\n", " ").replace("\r", " ")


def _fields(event: dict) -> str:
    """Fields a type has no words for, as `name=value`."""
    rest = {k: v for k, v in event.items() if k not in ("time", "type", "node")}
    # A string that could read as more fields (`error=x state=back`: an agent's words) is quoted.
    return " ".join(f"{k}={v if isinstance(v, str) and _BARE_RE.fullmatch(v) else json.dumps(v)}"
                    for k, v in sorted(rest.items()))


_BARE_RE = re.compile(r"[A-Za-z0-9_.:/%+@-]*")


def _key(event: dict) -> str:
    words = str(event.get("state"))
    if event.get("by"):
        words += f" by {event['by']}"
    words += f" (fingerprint {event.get('fingerprint')})"
    if event.get("address"):
        words += f" from {event['address']}"
    return words


def _node(event: dict) -> str:
    words = f"{event.get('state')}: {str(event.get('reason')).replace('_', ' ')}"
    words += f" from {event['address']}" if event.get("address") else ""
    return words + (f" ({event['suppressed']} up/down changes before it not told: flapping)"
                    if event.get("suppressed") else "")


def _job(event: dict) -> str:
    if event.get("state") == "started":
        nodes = event.get("nodes") or []
        count = event.get("node_count", len(nodes))
        more = f" and {count - len(nodes)} more" if count > len(nodes) else ""
        test = " (test)" if event.get("test") else ""
        return f"{event.get('job')} started {event.get('file')}{test} on {count} node(s): {', '.join(nodes)}{more}"
    from ..apply_view import counts_text

    summary = event.get("summary")
    counts = counts_text(summary if isinstance(summary, dict) else {})
    return f"{event.get('job')} {event.get('state')}: {event.get('result')}" + (f" ({counts})" if counts else "")


def _rollback(event: dict) -> str:
    changes = event.get("changes") or []
    moved = ", ".join(f"{c.get('interface')} {c.get('address')}" for c in changes if isinstance(c, dict))
    # The reason is the agent's words: quoted, so that they read as its words and nothing more.
    return f"network change{f' ({moved})' if moved else ''} rolled back: {json.dumps(event.get('reason'))}"


def _reboot(event: dict) -> str:
    """`pimaster reboot`/`shutdown` progress: the roll's start, batches, skips and end, each node's state."""
    state = str(event.get("state"))
    action = "shutdown" if event.get("action") == "poweroff" else "reboot"
    if state == "started":
        order = event.get("order") or []
        count = event.get("node_count", len(order))
        more = f" and {count - len(order)} more" if isinstance(count, int) and count > len(order) else ""
        batches = event.get("batches")
        batched = f" in {batches} batch(es)" if batches is not None else ""
        own = f" ({event['master_node']}, this master's node, last)" if event.get("master_node") else ""
        return f"{action} started: {count} node(s){batched}: {', '.join(map(str, order))}{more}{own}"
    if state == "batch":
        return f"batch {event.get('index')}/{event.get('of')}: {', '.join(map(str, event.get('nodes') or []))}"
    if state == "finished":
        summary = event.get("summary") if isinstance(event.get("summary"), dict) else {}
        counts = ", ".join(f"{n} {str(k).replace('_', ' ')}" for k, n in summary.items())
        skipped = f", {event['skipped']} skipped" if event.get("skipped") else ""
        return (f"{action} finished{'' if event.get('ok') else ' with failures'} in {event.get('elapsed_s')} s"
                f"{f': {counts}' if counts else ''}{skipped}")
    if state == "stopped":
        waiting = event.get("not_started") or []
        left = f" (not started: {', '.join(map(str, waiting))})" if waiting else ""
        return f"{action} stopped: {event.get('reason')}{left}"
    if state == "skipped":
        return f"skipped: {event.get('reason')}"
    # One node's state. A failure's error may hold its agent's words: quoted, so that they read as
    # its words and nothing more.
    words = state.replace("_", " ")
    if event.get("after_s") is not None:
        words += f" after {event['after_s']} s"
    if event.get("boot"):
        words += f" (new boot {event['boot']})"
    if event.get("error"):
        words += f": {json.dumps(event['error']) if state == 'failed' else event['error']}"
    return words


_TEXT = {
    "subscribed": lambda event: f"listening ({event.get('subscribers')} stream(s) open)",
    "key": _key,
    "node": _node,
    "job": _job,
    "network_rollback": _rollback,
    "reboot": _reboot,
    "lost": lambda event: f"{event.get('count')} event(s) lost: this stream read them too slowly",
}


@handler("events", streaming=True)
async def handle_events(master, emit) -> dict:
    """Streams the master's events to the client until it goes (or the master stops); the
    subscription goes with it. Waits for the client to take each event: one that does not read
    loses events (and is told how many), never costs the master memory."""
    import asyncio

    from ..control import Emitter
    from ..errors import ControlError

    if not isinstance(emit, Emitter) or emit.reader is None:
        raise ControlError("events streams to its client's connection, and this request has none")
    subscription = master.events.subscribe()

    async def pump() -> str:
        while True:
            event = await subscription.next()
            if event is None:
                return "the master is stopping"
            emit(event)
            await emit.drain()

    pumping, gone = asyncio.ensure_future(pump()), asyncio.ensure_future(emit.gone())
    try:
        done, _ = await asyncio.wait({pumping, gone}, return_when=asyncio.FIRST_COMPLETED)
        if pumping in done and not pumping.cancelled() and pumping.exception() is None:
            return {"ended": pumping.result()}
        return {"ended": "the client went away"}
    finally:
        master.events.unsubscribe(subscription)
        pumping.cancel()
        gone.cancel()
        # Gone for good before the connection is read again (a reader has one reading task at a time).
        await asyncio.gather(pumping, gone, return_exceptions=True)
