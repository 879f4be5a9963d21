"""`pimaster lab ...`: a simulated Pi cluster on this machine. The lab parses its own arguments
(`pimaster.lab.main(argv)`); nothing of it is imported unless this command runs."""

from __future__ import annotations

OWN_ARGUMENTS = True


def add_parser(sub, name, summary, common, as_json) -> None:
    sub.add_parser(name, help=summary, add_help=False)


def main(argv: list[str]) -> int:
    from ..lab import main as lab_main

    return lab_main(argv)
