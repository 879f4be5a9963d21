"""The daemon's control socket: a Unix socket (mode 0600 in the 0700 state dir, the peer's uid
checked with SO_PEERCRED) that answers JSON lines. Each request line, `{"cmd": NAME, "args": {..}}`,
goes to the handler registered for NAME (`pimaster.commands.handler`); the answer is one line,
`{"result": ..}` or `{"error": MESSAGE, "code": CODE}`, after any `{"event": ..}` lines a streaming
handler emits. A handler that asks (``asks=True``: `apply`, for the files of the client's state
tree) may put questions to its client meanwhile: a line `{"ask": QUESTION}`, answered by a line
`{"answer": {.., "size": N}}` and N bytes of data. The code tells the client what kind of error it is (`pimaster.errors`): `refused`
(a ControlError a handler raised, or arguments the handler does not take), `internal` (a bug: logged
with its traceback), `permission_denied` (another user's client).

A streaming handler's ``emit`` is an ``Emitter``: ``emit(event)`` writes an event line; a stream
with no end (`events`) also awaits ``emit.drain()`` (so that a client that does not read holds back
the handler, not the master's memory) and ``emit.gone()`` (the client closed its connection: the
handler ends and lets go of what it holds).

The client side is `pimaster.client`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct

from .commands import Handler
from .errors import ControlError

log = logging.getLogger("pimaster")

CONTROL_LINE_LIMIT = 1024 * 1024
# The data of one answer (a state tree's file: what a job message can carry), and how long a
# client may take to answer.
ANSWER_DATA_LIMIT = 16 * 1024 * 1024
ANSWER_TIMEOUT_S = 60.0


class ClientAsk:
    """Puts a handler's questions to the client of one connection, one at a time. A connection
    that fails to answer (closed, malformed, too slow) is closed: its stream is out of step."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()

    async def __call__(self, question: dict, timeout: float = ANSWER_TIMEOUT_S) -> tuple[dict, bytes]:
        async with self.lock:
            if self.writer.is_closing():
                raise ConnectionError("the client has gone")
            timeout = max(0.0, min(timeout, ANSWER_TIMEOUT_S))
            try:
                return await asyncio.wait_for(self._ask(question), timeout)
            except asyncio.TimeoutError:
                self._give_up(f"it did not answer in {timeout:.0f} s")
                raise ConnectionError(f"the client did not answer in {timeout:.0f} s") from None
            except (ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError) as exc:
                self._give_up(f"its answer was malformed ({type(exc).__name__})")
                raise ConnectionError(f"the client's answer was malformed ({type(exc).__name__})") from None

    def _give_up(self, why: str) -> None:
        """Ends the connection, telling the client why first: what it sends now is out of step."""
        log.warning("control socket: closed a client's connection: %s", why)
        message = {"error": f"the master stopped waiting for this command: {why}", "code": "client_too_slow"}
        self.writer.write(json.dumps(message).encode() + b"\n")
        self.writer.close()

    async def _ask(self, question: dict) -> tuple[dict, bytes]:
        self.writer.write(json.dumps({"ask": question}).encode() + b"\n")
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the client has gone")
        reply = json.loads(line)
        answer = reply.get("answer") if isinstance(reply, dict) else None
        if not isinstance(answer, dict):
            raise ValueError("no answer")
        size = answer.get("size", 0)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= ANSWER_DATA_LIMIT:
            raise ValueError(f"data size {size!r}")
        return answer, await self.reader.readexactly(size) if size else b""


class Emitter:
    """A streaming handler's way to its client: ``emit(event)`` writes ``{"event": event}`` (never
    raises, whatever the event holds); ``await drain()`` waits until the client has taken what was
    written (raises ConnectionError once it has gone); ``await gone()`` returns when the client has
    closed the connection (it reads the connection: not for a handler that asks)."""

    def __init__(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter | None) -> None:
        self.reader, self.writer = reader, writer

    def __call__(self, event: dict) -> None:
        if self.writer is not None and not self.writer.is_closing():
            # default=str: an event must never end the request it belongs to.
            self.writer.write(json.dumps({"event": event}, default=str).encode() + b"\n")

    async def drain(self) -> None:
        if self.writer is not None:
            if self.writer.is_closing():
                raise ConnectionError("the client has gone")
            await self.writer.drain()

    async def gone(self) -> None:
        if self.reader is None:
            await asyncio.Event().wait()  # no connection: never
        while await self.reader.read(4096):
            pass  # a client sends nothing during a stream: whatever it does send is dropped


class ControlServer:
    """Serves ``path`` for as long as it is open; handlers get ``context`` (the Master) first."""

    def __init__(self, path: str, context, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.context = context
        self.handlers = handlers
        self.server: asyncio.AbstractServer | None = None

    async def open(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # stale: the caller holds the state-dir lock, so no master owns it
        old_umask = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path, limit=CONTROL_LINE_LIMIT)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("control socket: refused a client with uid %d", uid)
                writer.write(b'{"error": "permission denied", "code": "permission_denied"}\n')
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"error": "request too large", "code": "refused"}\n')
                    return
                if not line:
                    return

                response = await self.request(line, Emitter(reader, writer), ClientAsk(reader, writer))
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def request(self, line: bytes, emit=None, ask=None) -> dict:
        """One request line -> its answer (never raises: a client must not take the master down)."""
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError("malformed request")
            handler = self.handlers.get(request["cmd"])
            if handler is None:
                raise ControlError(f"unknown command {request['cmd']!r}")
            args = request.get("args") or {}
            if not isinstance(args, dict):
                raise ControlError("malformed arguments")
            if handler.streaming:
                args["emit"] = emit or Emitter(None, None)
            if handler.asks:
                args["ask"] = ask
            return {"result": await handler.function(self.context, **args)}
        except ControlError as exc:
            return {"error": str(exc), "code": exc.code}
        except TypeError as exc:
            # Mostly a command of another version than this daemon (an upgrade without a restart).
            return {"error": f"bad arguments: {exc} (if pimaster was upgraded, restart the master: "
                             "`systemctl restart pimaster`)", "code": "refused"}
        except ValueError as exc:
            return {"error": f"bad request: {exc}", "code": "refused"}
        except Exception as exc:  # never let a client take the master down
            log.exception("control request failed")
            return {"error": f"internal error: {type(exc).__name__}: {exc}", "code": "internal"}
