"""`pimaster`: the command line. Finds the invoked command in `commands.COMMANDS`, imports only its
module, parses its arguments and runs it; and the output helpers the commands share.

Client commands reach the running master through its control socket (state dir/control.sock).
Imports are kept lean on purpose: `pimaster ping` of 1000 nodes must finish in a quarter of a
second, start-up included, so asyncio, zmq and rich are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .client import ControlClient
from .commands import COMMANDS, load
from .errors import ControlError

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


def _parser(name: str | None, module) -> argparse.ArgumentParser:
    """`pimaster`'s parser: every command is listed, only ``name``'s has its arguments (from ``module``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=os.environ.get("PIMASTER_STATE_DIR", DEFAULT_STATE_DIR),
                        help=f"the master's state directory (default {DEFAULT_STATE_DIR}; env PIMASTER_STATE_DIR)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    parser = argparse.ArgumentParser(prog="pimaster", description="Configuration management for Raspberry Pi clusters.")
    parser.add_argument("--version", action="version", version=f"pimaster {__version__}")
    parser.set_defaults(needs_master=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, (_module, summary) in COMMANDS.items():
        if command == name:
            module.add_parser(sub, command, summary, common, as_json)
        else:
            sub.add_parser(command, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The command is the first argument (`pimaster` itself has options only: --help, --version).
    name = argv[0] if argv and argv[0] in COMMANDS else None
    module = load(name) if name else None
    if getattr(module, "OWN_ARGUMENTS", False):
        return module.main(argv[1:])
    args = _parser(name, module).parse_args(argv)
    if not args.needs_master:
        return args.run(args)
    client = ControlClient(args.state_dir)
    try:
        return args.run(client, args)
    except ControlError as exc:
        print(f"pimaster: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pimaster ping | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def print_json(data) -> None:
    # One write of the whole text: json.dump would write it piece by piece.
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


Cell = "str | tuple[str, str]"  # text, or (text, rich style)


def table(title: str | None, columns: list[str], rows: list[list]) -> None:
    """Aligned columns through rich (colour only on a terminal).

    Built as one rich Text rather than a rich Table: a Table lays out 1000 rows in ~0.5 s, which
    would be most of `pimaster ping`'s budget on a large cluster; this takes ~20 ms. Not on a
    terminal, where rich would print the very same characters, they are written without it
    (importing rich's console alone takes ~40 ms).
    """
    cells = [[c if isinstance(c, tuple) else (str(c), "") for c in row] for row in rows]
    widths = [max([len(name)] + [len(row[i][0]) for row in cells]) for i, name in enumerate(columns)]
    header = "  ".join(name.ljust(widths[i]) for i, name in enumerate(columns)).rstrip()
    lines = [title] if title else []
    lines.append(header)
    lines += ["  ".join(value if i == len(row) - 1 else value.ljust(widths[i]) for i, (value, _) in enumerate(row))
              for row in cells]
    if _rich_would_print_as_is(lines):
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
    else:
        _rich_table(title, header, widths, cells)


def _rich_table(title: str | None, header: str, widths: list[int], cells: list[list[tuple[str, str]]]) -> None:
    from rich.console import Console
    from rich.text import Text

    text = Text()
    if title:
        text.append(title + "\n", style="bold")
    text.append(header, style="bold")
    for row in cells:
        text.append("\n")
        for i, (value, style) in enumerate(row):
            last = i == len(row) - 1
            text.append(value if last else value.ljust(widths[i]), style=style or None)
            if not last:
                text.append("  ")
    # soft_wrap: long lines are never folded (people compare fingerprints), the terminal wraps them.
    Console(soft_wrap=True, highlight=False).print(text)


def _rich_would_print_as_is(lines: list[str]) -> bool:
    """Whether rich would print ``lines`` unchanged: not to a terminal (nor told to act as if:
    FORCE_COLOR, TTY_COMPATIBLE), so no styles; printable text only (rich drops control codes
    and expands tabs); and a rich that leaves soft-wrapped lines whole (an older one, such as
    bookworm's 13.3, also trims trailing spaces past the console's width: it prints those)."""
    if "FORCE_COLOR" in os.environ or "TTY_COMPATIBLE" in os.environ:
        return False
    try:
        if sys.stdout.isatty():
            return False
    except ValueError:
        return False
    if not all(line.isprintable() for line in lines):
        return False
    try:
        from rich.text import Text

        probe = Text("a  ").wrap(None, 1, justify="default", overflow="ignore", no_wrap=True)
        return [line.plain for line in probe] == ["a  "]
    except Exception:  # another rich: let it print
        return False


def ago(ts: float | None) -> str:
    """How long ago ``ts`` was, roughly: `never`, `42s ago`, `5m ago`, `3h ago`, `2d ago`."""
    if not ts:
        return "never"
    delta = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if delta >= size:
            return f"{delta / size:.0f}{unit} ago"
    return f"{delta:.0f}s ago"


def local_time(ts: float | None) -> str:
    """``ts`` as this machine's local date and time (`2026-12-02 01:23:45`), or `-`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def duration(seconds: float | None) -> str:
    """A span as days and hours (`3d04h`) or hours and minutes (`4h07m`)."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{rest // 60:02d}m"
