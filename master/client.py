"""Client side of the master's control socket: one JSON request line, one JSON response line
(after the events, and the answers to the master's questions, of a streaming request).

Imported by every client command: stdlib only (socket, json), nothing the daemon needs.
"""

from __future__ import annotations

import errno
import json
import os
import socket

from .errors import ControlError, MasterUnreachable

__all__ = ["ControlClient", "ControlError", "MasterUnreachable"]


class ControlClient:
    """Talks to the master daemon that owns ``state_dir`` (its control.sock)."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, "control.sock")

    def call(self, cmd: str, timeout_extra: float = 30.0, on_event=None, on_ask=None, **args) -> dict:
        """Send one request; events streamed before the answer go to ``on_event``, and questions
        the master asks meanwhile to ``on_ask(question) -> (answer, data)`` (`apply`'s for the
        files of the state tree), whose answer goes back at once.

        Raises MasterUnreachable when no master answers (none running, no answer in time, the
        connection lost), ControlError with the master's code (`refused`, `internal`) when it
        answers with an error."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_extra)
        try:
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                raise MasterUnreachable(f"no master running: no control socket at {self.path} (start `pimaster serve`, "
                                   "or point --state-dir / PIMASTER_STATE_DIR at the master's state directory)") from None
            except PermissionError:
                raise MasterUnreachable(f"permission denied on {self.path}: the control socket is usable only by "
                                        "the user the master runs as (root for the service)",
                                        code="permission_denied") from None
            except ConnectionRefusedError:
                raise MasterUnreachable(f"the master at {self.path} is not running (stale socket)") from None
            except OSError as exc:
                raise MasterUnreachable(f"cannot reach the master at {self.path}: {exc.strerror}") from None
            try:
                sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the master may refuse (and close) before reading: its answer is still there
            buffer = bytearray()
            data = b""
            while not data:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, _, rest = bytes(buffer).partition(b"\n")
                    buffer = bytearray(rest)
                    if line.startswith(b'{"event"'):
                        if on_event is not None:
                            on_event(json.loads(line)["event"])
                    elif line.startswith(b'{"ask"'):
                        answer, payload = _answer(on_ask, json.loads(line)["ask"])
                        sock.sendall(json.dumps({"answer": dict(answer, size=len(payload))}).encode()
                                     + b"\n" + payload)
                    else:
                        data = line
                        break
        except socket.timeout:
            raise MasterUnreachable(f"the master did not answer {cmd!r} in time") from None
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                raise MasterUnreachable("the master closed the connection") from None
            raise
        finally:
            sock.close()
        if not data:
            raise MasterUnreachable("the master closed the connection without an answer")
        try:
            response = json.loads(data)
        except ValueError:
            raise ControlError("the master sent a malformed answer", code="internal") from None
        if "error" in response:
            # A master older than the codes sends none: taken as a refusal.
            code = response.get("code")
            raise ControlError(str(response["error"]), code=code if isinstance(code, str) else None)
        return response["result"]


def _answer(on_ask, question) -> tuple[dict, bytes]:
    """``on_ask``'s answer to the master's question; a failure is an answer too (the master's
    rendering then says why), never this command's traceback."""
    if on_ask is None:
        return {"kind": "error", "why": "this client answers no questions"}, b""
    try:
        return on_ask(question)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        return {"kind": "error", "why": f"{type(exc).__name__}: {exc}"}, b""
