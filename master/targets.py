"""Which nodes a command acts on (its target), and in which batches.

The daemon side of every command that takes a TARGET resolves it here, once: `resolve_target`
gives the accepted nodes in it (roles from the inventory the last apply read). `apply` matches
against the inventory it reads itself (`cli.target_matches`, the one meaning of a target).

Batches (`--batch N|N%`) split the matched nodes into groups acted on one after the other.
"""

from __future__ import annotations

import argparse
import math

from .errors import ControlError

MAX_BATCH = 100_000


def parse_batch(text: str) -> str:
    """The argparse type of `--batch`: a number of nodes (`2`) or a share of them (`25%`)."""
    text = text.strip()
    number = text[:-1] if text.endswith("%") else text
    try:
        value = int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a batch size: a number of nodes (2) or a share (25%)") from None
    if value < 1 or (text.endswith("%") and value > 100) or value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"{text!r}: a batch is at least one node"
                                         + (", and at most 100%" if text.endswith("%") else ""))
    return f"{value}%" if text.endswith("%") else str(value)


def checked_batch(batch) -> str | None:
    """A `--batch` as a control request carried it (from any client: checked again), or ControlError."""
    if batch is None:
        return None
    if not isinstance(batch, (str, int)) or isinstance(batch, bool):
        raise ControlError("batch: a number of nodes (2) or a share of them (25%)")
    try:
        return parse_batch(str(batch))
    except argparse.ArgumentTypeError as exc:
        raise ControlError(str(exc)) from None


def batch_size(batch: str | None, total: int) -> int:
    """Nodes per batch for ``total`` nodes: all of them for none; a share rounds up (at least 1)."""
    if not batch or total == 0:
        return max(total, 1)
    if batch.endswith("%"):
        return max(1, math.ceil(total * int(batch[:-1]) / 100))
    return int(batch)


def batches(nodes: list[str], batch: str | None) -> list[list[str]]:
    """``nodes`` in batches of `batch_size`, in their order."""
    size = batch_size(batch, len(nodes))
    return [nodes[i:i + size] for i in range(0, len(nodes), size)]


async def resolve_target(master, target: str | None) -> list[str]:
    """The accepted nodes in ``target`` (None: every one), sorted; ControlError when it is malformed
    or matches no node (a target that matches nothing is a mistake, never an empty success)."""
    from .cli import ROLE_PREFIX, checked_target

    roles = None
    if target is not None:
        target = checked_target(target)
        if ROLE_PREFIX in target:
            from .commands.ping import node_roles

            roles = await node_roles(master)
    nodes = master.roster.targets(target, roles)
    if not nodes:
        raise ControlError(f"no accepted node matches {target or '*'}")
    return nodes
