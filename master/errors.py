"""The one error the master's control socket knows: a request that cannot be done.

Raised by the daemon's command handlers (its message goes back to the client as the answer's
`error`) and by the client (the CLI prints it as `pimaster: <message>`). Kept in a module of its
own, with no imports, so that the CLI, the handlers and `jobs.py` share it without a cycle.
"""


class ControlError(Exception):
    """A control request that cannot be done: the message goes to the user as is."""
