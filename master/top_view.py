"""What `pimaster top` and `pimaster health` print: the rows, the sparklines, the live view.

`top` asks the master for its latest samples (the `top` request) every --refresh and redraws a rich
Live view on the terminal's alternate screen. Keys are read from the terminal in cbreak mode
(one key at a time, no echo), which is put back as it was however the view ends (q, Ctrl-C, an
error). Off a terminal, or with --once, one frame is printed (plain text off a terminal).
Agents' values reach here checked (`results.check_health`); node ids are valid ids.
"""

from __future__ import annotations

import os
import sys
import time

from .cli import EXIT_OK, ago, local_time, table

SPARKS = "▁▂▃▄▅▆▇█"
# The temperature sparkline's range, fixed so that nodes compare at a glance.
TEMP_RANGE = (30.0, 90.0)
SORTS = {"n": "name", "t": "temperature", "l": "load"}
COLUMNS = ["NODE", "STATE", "TEMP", "TEMP 1h", "LOAD", "LOAD 1h", "THROTTLING", "RTT", "CLOCK", "MEM", "DISK /",
           "SEEN"]
URGENT_FLAGS = ("under-voltage", "throttled", "arm-frequency-capped", "soft-temperature-limit")


def sparkline(values: list, low: float, high: float) -> str:
    """One character per value (a space where there is none), ▁ at ``low`` or below, █ at ``high``."""
    span = max(high - low, 1e-9)
    out = []
    for value in values:
        if value is None:
            out.append(" ")
            continue
        level = int((min(max(value, low), high) - low) / span * (len(SPARKS) - 1) + 0.5)
        out.append(SPARKS[level])
    return "".join(out)


def _order(nodes: list[dict], sort: str) -> list[dict]:
    def key(node: dict):
        down = 0 if node.get("up") is False else 1 if node.get("up") is None else 2
        if sort == "temperature":
            return (down, -(node.get("temp_c") if node.get("temp_c") is not None else -1e9), node["id"])
        if sort == "load":
            load = (node.get("load") or [None])[0]
            return (down, -(load if load is not None else -1e9), node["id"])
        return (down, node["id"])
    return sorted(nodes, key=key)


def _flags_cell(node: dict):
    flags = node.get("throttled_flags")
    if flags is None:
        return "-"
    if not flags:
        return ("ok", "green")
    now = [f for f in flags if f in URGENT_FLAGS]
    text = ",".join(flags)
    if "under-voltage" in now:
        return (text, "bold red")
    return (text, "red" if now else "yellow")


def rows(data: dict, sort: str = "name") -> list[list]:
    """The table's rows (cells as text or (text, style)), nodes down first."""
    out = []
    for node in _order(data.get("nodes", []), sort):
        lines = node.get("sparklines") or {}
        temps, loads = lines.get("temp_c") or [], lines.get("load1") or []
        load_top = max([1.0] + [v for v in loads if v is not None])
        seen = ago(node.get("last_seen"))
        if node.get("up") is False:
            state = ("down", "bold red")
            out.append([node["id"], state, "-", sparkline(temps, *TEMP_RANGE), "-", sparkline(loads, 0, load_top),
                        _flags_cell(node), "-", "-", "-", "-", (f"{seen}: {node.get('error', '')}", "red")])
            continue
        if node.get("up") is None:
            out.append([node["id"], ("up" if node.get("connected") else "down", "dim"), "-", "", "-", "", "-", "-",
                        "-", "-", "-", f"{seen} (no health round yet)"])
            continue
        temp = node.get("temp_c")
        temp_cell = "-" if temp is None else (f"{temp:.1f}°C", "bold red" if temp >= 80 else "yellow" if temp >= 70 else "")
        load = (node.get("load") or [None])[0]
        out.append([
            node["id"], ("up", "green"), temp_cell, sparkline(temps, *TEMP_RANGE),
            "-" if load is None else f"{load:.2f}", sparkline(loads, 0, load_top), _flags_cell(node),
            "-" if node.get("rtt_ms") is None else f"{node['rtt_ms']:.1f} ms",
            "-" if node.get("clock_offset_ms") is None else f"{node['clock_offset_ms']:+.1f} ms",
            "-" if node.get("memory_used_pct") is None else f"{node['memory_used_pct']:.0f}%",
            "-" if node.get("disk_root_used_pct") is None else f"{node['disk_root_used_pct']:.0f}%", seen])
    return out


def summary_line(data: dict, sort: str) -> str:
    nodes = data.get("nodes", [])
    down = sum(1 for n in nodes if n.get("up") is False)
    hot = sum(1 for n in nodes if set(n.get("throttled_flags") or ()) & set(URGENT_FLAGS))
    return (f"pimaster top  {local_time(data.get('time'))}  {len(nodes)} nodes, {down} down, {hot} throttling or "
            f"under-voltage  (health every {data.get('interval_s', 0):g}s; sorted by {sort})")


def print_frame(data: dict, sort: str = "name") -> None:
    print(summary_line(data, sort))
    table(None, COLUMNS, rows(data, sort))


def _rich_frame(data: dict, sort: str):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold", expand=False)
    for name in COLUMNS:
        grid.add_column(name, no_wrap=True, overflow="ellipsis")
    for row in rows(data, sort):
        cells = []
        for cell in row:
            text, style = cell if isinstance(cell, tuple) else (str(cell), "")
            cells.append(Text(text, style=style or ""))
        grid.add_row(*cells)
    keys = Text("t temperature  l load  n name  q quit", style="dim")
    return Group(Text(summary_line(data, sort), style="bold"), grid, keys)


def run_top(client, args) -> int:
    data = client.call("top")
    sort = "name"
    if args.once or not sys.stdout.isatty() or not sys.stdin.isatty():
        print_frame(data, sort)
        return EXIT_OK
    import select
    import termios
    import tty

    from rich.console import Console
    from rich.live import Live

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        with Live(_rich_frame(data, sort), console=Console(), screen=True, auto_refresh=False) as live:
            due = time.monotonic() + args.refresh
            while True:
                ready, _, _ = select.select([fd], [], [], max(0.0, due - time.monotonic()))
                if ready:
                    key = os.read(fd, 1).decode(errors="replace").lower()
                    if key in ("q", "\x04"):
                        break
                    if key in SORTS:
                        sort = SORTS[key]
                        live.update(_rich_frame(data, sort), refresh=True)
                if time.monotonic() >= due:
                    data = client.call("top")
                    live.update(_rich_frame(data, sort), refresh=True)
                    due = time.monotonic() + args.refresh
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return EXIT_OK


def print_history(result: dict) -> None:
    """`pimaster health NODE`'s table, oldest first, then its events."""
    out = []
    for s in result.get("samples", []):
        def value(name: str, fmt: str, unit: str = "", extreme: str | None = None) -> str:
            if s.get(name) is None:
                return "-"
            text = format(s[name], fmt) + unit
            other = s.get(f"{name}_{extreme}") if extreme else None
            if other is not None and s["resolution"] != "raw" and other != s[name]:
                text += f" ({extreme} {format(other, fmt)})"
            return text
        state = ("up", "green") if s["up"] else (("down", "red") if not s["answered"] else
                                                (f"up {s['answered']}/{s['samples']}", "yellow"))
        flags = s.get("throttled_flags")
        out.append([local_time(s["time"]), s["resolution"], state, value("temp_c", ".1f", "°C", "max"),
                    value("load1", ".2f", "", "max"), ",".join(flags) if flags else ("ok" if flags == [] else "-"),
                    value("rtt_ms", ".1f", " ms", "max"), value("clock_offset_ms", "+.1f", " ms"),
                    value("memory_used_pct", ".0f", "%", "max"), value("disk_root_used_pct", ".0f", "%", "max")])
    node = result.get("node")
    title = f"{node}: health since {local_time(result.get('since'))} (every {result.get('interval_s', 0):g}s)"
    if result.get("truncated"):
        title += "; older rows left out"
    table(title, ["TIME", "RES", "STATE", "TEMP", "LOAD", "THROTTLING", "RTT", "CLOCK", "MEM", "DISK /"], out)
    if not out:
        print("no samples yet")
    events = result.get("events") or []
    if events:
        print("events:")
        for event in events:
            detail = event.get("error") or ",".join(event.get("flags") or [])
            print(f"  {local_time(event.get('time'))}  {event.get('state')}" + (f"  {detail}" if detail else ""))
