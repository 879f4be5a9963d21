"""The errors of a control request: ``ControlError`` (the request cannot be done) and
``MasterUnreachable`` (the client cannot reach the master at all).

Raised by the daemon's command handlers (the message goes back to the client as the answer's
`error`, the ``code`` as its `code`) and by the client (the CLI prints `pimaster: <message>`, with
`--json` also `{"error": message, "code": code}` on stdout, and exits with the code's status: see
`pimaster.cli.EXIT_STATUS`). Kept in a module of its own, with no imports, so that the CLI, the
handlers and `jobs.py` share it without a cycle.

Codes: `refused` (the master refused the request: bad input, a state file that does not render,
no such key, job or token), `internal` (the master failed on a request; its log has the traceback),
`unreachable` (no master answers at the state dir's control socket), `permission_denied` (a master
runs, but not for this user).
"""


class ControlError(Exception):
    """A control request that cannot be done: the message goes to the user as is. Every raise
    site in a handler is a refusal of what was asked, hence the default code."""

    code = "refused"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class MasterUnreachable(ControlError):
    """No master answers at the control socket (none running, a stale socket, no answer in time,
    the connection lost), or the socket is not this user's (code `permission_denied`)."""

    code = "unreachable"
