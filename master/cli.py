"""`pimaster`: the command line. Finds the invoked command in `commands.COMMANDS`, imports only its
module, parses its arguments and runs it; and what the commands share: the output helpers, the
errors and exit statuses, the target and duration syntax.

Client commands reach the running master through its control socket (state dir/control.sock).
Imports are kept lean on purpose: `pimaster ping` of 1000 nodes must finish in a quarter of a
second, start-up included, so asyncio, zmq and rich are imported only by the commands that need them.

Conventions every command follows:

- Global options, `--state-dir DIR` and `--json` (for the commands that print JSON), go before the
  command or after it: `pimaster --state-dir D ping` is `pimaster ping --state-dir D`.
- A target (`add_target`; its syntax and meaning in `pimaster.targets`) is node id globs, `role:NAME`
  and `FACT=GLOB` terms, all of which a node must match; a duration (`Duration`) is seconds or a
  number with a unit: `90`, `90s`, `30m`, `24h`, `7d`.
- Errors: `pimaster: MESSAGE` on stderr and, with --json, `{"error": MESSAGE, "code": CODE, ...}` on
  stdout (`report_error`); the exit status says what went wrong (``EXIT_STATUS``).
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
# The target syntax, here for the commands that import it from the CLI.
from .targets import (MAX_TARGET_TEXT, ROLE_PREFIX, checked_target, fact_names, parse_target,  # noqa: F401
                      target_matches)

DEFAULT_STATE_DIR = "/var/lib/pimaster"

# Exit statuses: 0 all went well; 1 a node failed, did not answer or is down (or the master failed
# on the request: an internal error); 2 a usage error or input the master refused (nothing was
# done); 3 no master to talk to (none running at the state dir, not this user's, no answer).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# An error's code (`pimaster.errors`; `usage` for the command line's own) -> the exit status.
# `confirmation_needed`: acting on several keys needs --yes off a terminal; `declined`: the person said no.
EXIT_STATUS = {"usage": EXIT_USAGE, "refused": EXIT_USAGE, "confirmation_needed": EXIT_USAGE,
               "internal": EXIT_FAILED, "declined": EXIT_FAILED,
               "unreachable": EXIT_UNREACHABLE, "permission_denied": EXIT_UNREACHABLE}

# Options `pimaster` takes before the command as well as after it (after it, for the commands that
# have them): option -> whether it takes a value.
GLOBAL_OPTIONS = {"--state-dir": True, "--json": False}

# {inventory}: where the command reads the nodes' roles from.
TARGET_HELP = ("the nodes: a glob on node ids (node0[1-4], 'pi*') or a comma list of them (node01,node03); "
               "role:NAME, the nodes whose roles include NAME in {inventory}; FACT=GLOB, the nodes whose fact "
               "matches (arch=arm64, os_codename=bookworm, 'model=*Pi 5*'; facts: {facts}); !TERM, the nodes TERM does not match ('* !node04'); terms separated "
               "by spaces must all match ('role:compute arch=arm64'; a word after FACT=GLOB that starts no term "
               "continues its glob: node globs first, or id=GLOB); default every accepted node")


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
    if not 0 < value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError(f"{text!r}: a duration must be positive and finite")
    return value


class Duration:
    """The argparse type of every duration option: `parse_duration`'s forms (plain seconds too),
    at most ``maximum`` seconds when given."""

    def __init__(self, maximum: float | None = None) -> None:
        self.maximum = maximum

    def __call__(self, text: str) -> float:
        seconds = parse_duration(text)
        if self.maximum is not None and seconds > self.maximum:
            raise argparse.ArgumentTypeError(f"{text!r} is longer than the longest allowed, {_span(self.maximum)}")
        return seconds


def _span(seconds: float) -> str:
    """``seconds`` in the largest unit that divides it: `600` -> `10m`, `2592000` -> `30d`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:g}s"


class _TargetAction(argparse.Action):
    """Stores a target given as the positional TARGET or as --target: one of them, or both alike."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value is None:  # the optional positional, not given
            return
        given = getattr(namespace, self.dest, None)
        if given is not None and given != value:
            raise argparse.ArgumentError(self, f"two targets, {given!r} and {value!r}: give one")
        setattr(namespace, self.dest, value)


def add_target(parser: argparse.ArgumentParser, positional: bool = False,
               inventory: str = "the inventory next to the state file (cluster.yaml)") -> None:
    """`--target TARGET` on ``parser`` (``args.target``, None for every node); with ``positional``,
    also a TARGET argument that means the same (`pimaster ping 'pi*'`). ``inventory``: where the
    command reads roles from, for the help."""
    help = TARGET_HELP.format(inventory=inventory, facts=fact_names())
    if positional:
        parser.add_argument("target", nargs="?", metavar="TARGET", type=parse_target, action=_TargetAction, help=help)
    parser.add_argument("--target", dest="target", metavar="TARGET", type=parse_target, action=_TargetAction,
                        help="the same as TARGET" if positional else help)


def report_error(args, message: str, code: str = "usage", text: str | None = None, **extra) -> int:
    """Tells the user of an error and returns the exit status for ``code`` (``EXIT_STATUS``):
    `pimaster: MESSAGE` (or ``text``) on stderr and, with --json, `{"error": MESSAGE, "code": CODE,
    **extra}` on stdout, so that a script reading stdout always gets JSON."""
    if getattr(args, "json", False):
        print_json({**extra, "error": message, "code": code})
        sys.stdout.flush()
    sys.stderr.write(text if text is not None else f"pimaster: {message}\n")
    return EXIT_STATUS.get(code, EXIT_FAILED)


class _JsonUsageErrors(argparse.ArgumentParser):
    """The parser when --json is on the command line: a usage error is also a JSON error object
    on stdout (then argparse's usage and message on stderr, exit status 2)."""

    def error(self, message: str):
        print_json({"error": message, "code": "usage"})
        sys.stdout.flush()
        super().error(message)


def _parser(name: str | None, module, json_errors: bool = False) -> argparse.ArgumentParser:
    """`pimaster`'s parser: every command is listed, only ``name``'s has its arguments (from ``module``)."""
    parser_class = _JsonUsageErrors if json_errors else argparse.ArgumentParser
    common = argparse.ArgumentParser(add_help=False)
    # No default here: `main` settles it, from this, the same option before the command, the environment.
    common.add_argument("--state-dir", metavar="DIR",
                        help=f"the master's state directory (default {DEFAULT_STATE_DIR}; env PIMASTER_STATE_DIR)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    # allow_abbrev off: `main` finds the command past the global options by their full names.
    parser = parser_class(prog="pimaster", description="Configuration management for Raspberry Pi clusters.",
                          allow_abbrev=False,
                          epilog="--state-dir and --json may also come after the command. Exit status: 0 ok; "
                                 "1 a node failed or is down; 2 usage error or refused input; 3 master unreachable.")
    parser.add_argument("--version", action="version", version=f"pimaster {__version__}")
    parser.add_argument("--state-dir", dest="global_state_dir", metavar="DIR",
                        help=f"the master's state directory (default {DEFAULT_STATE_DIR}; env PIMASTER_STATE_DIR)")
    parser.add_argument("--json", dest="global_json", action="store_true",
                        help="print JSON (the commands that have --json)")
    parser.set_defaults(needs_master=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command, (_module, summary) in COMMANDS.items():
        if command == name:
            module.add_parser(sub, command, summary, common, as_json)
        else:
            sub.add_parser(command, help=summary, add_help=False)
    return parser


def _command_at(argv: list[str]) -> int | None:
    """Where the command is in ``argv``: the first argument that is no global option (nor the
    value of one), if it names a command."""
    i = 0
    while i < len(argv):
        option, equals, _ = argv[i].partition("=")
        if option not in GLOBAL_OPTIONS:
            return i if argv[i] in COMMANDS else None
        i += 1 if equals or not GLOBAL_OPTIONS[option] else 2
    return None


def _settle_global_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One value per global option, whether given before the command or after it (after wins)."""
    args.state_dir = (getattr(args, "state_dir", None) or args.global_state_dir
                      or os.environ.get("PIMASTER_STATE_DIR") or DEFAULT_STATE_DIR)
    if args.global_json:
        if not hasattr(args, "json"):
            parser.error(f"{args.command} has no --json output")
        args.json = True
    del args.global_state_dir, args.global_json


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    at = _command_at(argv)
    name = argv[at] if at is not None else None
    module = load(name) if name else None
    if getattr(module, "OWN_ARGUMENTS", False):
        # It parses its own arguments: the global options given before it come after it.
        return module.main(argv[at + 1:] + argv[:at])
    # Only an option before `--`: what follows it is a command's own words (`run -- CMD --json`).
    parser = _parser(name, module, json_errors="--json" in argv[:argv.index("--") if "--" in argv else None])
    args = parser.parse_args(argv)
    _settle_global_options(parser, args)
    if not args.needs_master:
        return args.run(args)
    client = ControlClient(args.state_dir)
    try:
        return args.run(client, args)
    except ControlError as exc:
        return report_error(args, str(exc), exc.code)
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
        _rich_table(title, columns, header, widths, cells)


def _rich_table(title: str | None, columns: list[str], header: str, widths: list[int],
                cells: list[list[tuple[str, str]]]) -> None:
    from rich.console import Console
    from rich.text import Text

    console = Console(soft_wrap=True, highlight=False)
    fixed = sum(widths[:-1]) + 2 * (len(widths) - 1)  # every column but the last, and the gaps
    if console.is_terminal and fixed + widths[-1] > console.width and fixed + 16 <= console.width:
        # Wider than this terminal: a rich Table fits it, the last column (a note, a detail)
        # folded inside its own width. Slower, only then. Narrower still, the terminal wraps the
        # lines as before: nothing is ever cut off (a fingerprint stays whole).
        from rich.table import Table

        fitted = Table(title=title, title_justify="left", title_style="bold", box=None, pad_edge=False,
                       padding=(0, 2, 0, 0), header_style="bold", expand=False)
        for i, name in enumerate(columns):  # the last column (a note, a detail) gives way first
            fitted.add_column(name, overflow="fold", no_wrap=i < len(columns) - 1)
        for row in cells:
            fitted.add_row(*(Text(value, style=style or "") for value, style in row))
        Console(highlight=False).print(fitted)
        return

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
    console.print(text)


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
    """``ts`` as this machine's local date and time with its zone (`2026-12-02 03:15:30 CET`), or
    `-`: every absolute time the CLI prints names its zone (tokens say UTC)."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts)) if ts else "-"


def duration(seconds: float | None) -> str:
    """A span as days and hours (`3d04h`) or hours and minutes (`4h07m`)."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d{hours:02d}h" if days else f"{hours}h{rest // 60:02d}m"
