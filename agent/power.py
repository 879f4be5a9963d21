"""Reboot and poweroff on the master's request (`pimaster reboot`, `pimaster shutdown`).

The agent answers the `reboot` request first and acts after its ``delay_s``, so that the answer
leaves before the node goes down: ``systemctl reboot`` or ``systemctl poweroff``. In the lab, a
node's `systemctl reboot` makes nspawn exit with 133 and the node's supervisor boots it again;
`poweroff` leaves it down, as a Pi.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex

from . import facts
from . import protocol as proto

DEFAULT_DELAY_S = 2.0
# Test-only: a command run instead of `systemctl reboot|poweroff` (the action appended), so that a
# loopback test can fake a node's reboot with real agents. Never set on a node.
TEST_COMMAND_ENV = "PIAGENT_TEST_REBOOT_COMMAND"


class PowerAction:
    """At most one reboot or poweroff pending in this agent."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._task: asyncio.Task | None = None

    def accept(self, body: dict, running_job: str | None) -> dict:
        """The request's answer: the action taken (with this boot's identity), or an error. Refused
        while a job runs (``running_job``: its id, None when none runs): a reboot in the middle of an
        apply would leave its states half done. The refusal names the job, for `pimaster job cancel`."""
        action = body.get("action")
        if action not in proto.REBOOT_ACTIONS:
            return {"error": f"unknown action {str(action)[:40]!r} (reboot, poweroff)"}
        delay = body.get("delay_s", DEFAULT_DELAY_S)
        if not proto.is_number(delay) or not 0 <= delay <= proto.MAX_REBOOT_DELAY_S:
            return {"error": f"delay_s must be a number of seconds from 0 to {proto.MAX_REBOOT_DELAY_S:g}"}
        if running_job:
            return {"error": f"job {running_job} is running on this node: wait for it to finish, or cancel it: "
                             f"pimaster job cancel {running_job}"}
        if self._task is None or self._task.done():
            self.log.warning("the master asked for a %s: in %g s", action, delay)
            self._task = asyncio.ensure_future(self._act(action, float(delay)))
        return {"action": action, "delay_s": delay, **facts.boot_identity()}

    async def _act(self, action: str, delay: float) -> None:
        await asyncio.sleep(delay)
        test_command = os.environ.get(TEST_COMMAND_ENV)
        argv = [*shlex.split(test_command), action] if test_command else ["systemctl", action]
        self.log.warning("%s now (%s)", action, " ".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
            rc = await proc.wait()
        except OSError as exc:
            self.log.error("could not %s: %s", action, exc)
            return
        if rc != 0:
            self.log.error("%s failed: %s exited %d", action, argv[0], rc)
