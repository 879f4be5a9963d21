"""A hostile peer of the master, for tests/test_hostile.py: a real process speaking the wire protocol.

Threat model: root on one Pi (its key is accepted, it may send anything the protocol allows, with
any facts), and anyone on the LAN (no accepted key at all). Run it with the venv's python and
PYTHONPATH pointing at a directory where `piagent` is the repo's agent/ (harness.source_path).

Two modes:

``agent``: one node with its own CURVE key pair (made afresh, or loaded from/saved to ``--key``
so that a test can reconnect as the same key). It fetches the master's key from the announce port
(port + 1), connects a CURVE DEALER, sends ``enroll`` with ``{"id", "facts", "catalog", "token"}``
and then:

- answers ``ping`` with a health body and ``facts`` with its facts;
- answers ``apply`` with ``{"accepted": true}`` and then sends a ``job_result`` (by default every
  state ok and unchanged; ``--results FILE`` scripts it, see ``JobScript``);
- records every message it receives (type, id, reply_to, body) as JSON lines in ``--record``:
  this is how a test sees exactly what the master sent to this node (states, ``redact``, secrets);
- after its enrollment is answered (or 3 s without an answer) sends the scripted messages of
  ``--send FILE``, and at any time those appended as JSON lines to ``--commands FILE``;
- logs what it does to stdout and exits 0 on SIGTERM.

``flood``: ``--keys N`` fresh random keys, each its own CURVE session, that either send one
``--bytes M`` frame of msgpack (``--mode big``: an array of empty maps, or ``--shape enroll``: an
enrollment whose facts hold them), enroll with ``--facts-bytes K`` of facts (``--mode enroll``),
or connect and stay idle (``--mode idle``, until SIGTERM or ``--hold`` seconds). It prints one JSON
summary line at the end (``{"flood": {...}}``). All traffic goes where ``--master`` says (the tests:
127.0.0.1 only).

JSON in the files given to this tool may use tags for what JSON cannot say:
``{"$b64": "..."}`` is bytes, ``{"$repeat": "x", "$n": 100000}`` a long string, ``{"$maps": N}`` a
list of N empty maps; NaN and Infinity are JSON's (Python's) NaN / Infinity literals.

Scripted messages (``--send`` is a JSON list, ``--commands`` JSON lines), each one of:

- ``{"type": T, "body": B}`` an envelope (``"envelope": {...}`` overrides its fields, e.g.
  ``{"v": 2}``; ``"exp"`` / ``"reply_to"`` set those), ``"repeat": N`` sends it N times;
- ``{"raw_b64": "..."}`` one raw frame; ``{"raw_msgpack": VALUE}`` VALUE packed as the frame;
  ``{"frames_b64": [...]}`` a multi-frame message; each may carry ``"repeat"`` too;
- ``{"sleep": S}``; ``{"enroll": true}`` sends the enrollment again (``"token"``, ``"facts"``,
  ``"id"`` override it).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import resource
import signal
import struct
import sys
import time

import msgpack
import zmq

from piagent import protocol as proto

from piagent import keys

from piagent import config as pconfig
from piagent.protocol import Message

STOP = False


def _on_term(signum, frame) -> None:
    global STOP
    STOP = True


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ---------------------------------------------------------------------------------------------
# JSON with tags

def untag(value):
    """The value a test meant: tagged JSON -> bytes, long strings, many maps (recursively)."""
    if isinstance(value, dict):
        if set(value) == {"$b64"}:
            return base64.b64decode(value["$b64"])
        if set(value) == {"$repeat", "$n"}:
            return str(value["$repeat"]) * int(value["$n"])
        if set(value) == {"$maps"}:
            return [{} for _ in range(int(value["$maps"]))]
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def load_json(path: str | None, default=None):
    if not path:
        return default
    with open(path) as fh:
        return untag(json.load(fh))


def to_json(value) -> str:
    """For the record file: bytes become {"$b64": ...}; anything else JSON cannot hold, its repr."""
    def fallback(item):
        if isinstance(item, (bytes, bytearray, memoryview)):
            return {"$b64": base64.b64encode(bytes(item)).decode()}
        return repr(item)

    return json.dumps(value, default=fallback)


# ---------------------------------------------------------------------------------------------
# Keys and the master

def fetch_master_key(ctx: zmq.Context, host: str, key_port: int, timeout_s: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    while True:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(f"tcp://{host}:{key_port}")
            sock.send(proto.encode(Message(type=proto.MASTER_KEY)))
            if sock.poll(2000):
                reply = proto.decode(sock.recv_multipart()[-1], frozenset({proto.MASTER_KEY}))
                key = reply.body.get("key")
                if keys.is_public_key(key):
                    return key.encode() if isinstance(key, str) else key
        finally:
            sock.close(0)
        if time.monotonic() > deadline:
            raise SystemExit(f"hostile: no master key from {host}:{key_port}")


def load_or_make_key(path: str | None) -> tuple[bytes, bytes]:
    if path and os.path.exists(path):
        with open(path, "rb") as fh:
            secret = fh.read().strip()
        return zmq.curve_public(secret), secret
    public, secret = zmq.curve_keypair()
    if path:
        with open(path, "wb") as fh:
            fh.write(secret + b"\n")
        os.chmod(path, 0o600)
    return public, secret


def curve_dealer(ctx: zmq.Context, master_key: bytes, keypair: tuple[bytes, bytes], host: str, port: int,
                 reconnect: bool = True) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = 30000
    sock.curve_publickey, sock.curve_secretkey = keypair
    sock.curve_serverkey = master_key
    if not reconnect:
        sock.reconnect_ivl = -1
    sock.connect(f"tcp://{host}:{port}")
    return sock


def default_catalog() -> dict:
    from piagent.states import catalog

    return catalog()


# ---------------------------------------------------------------------------------------------
# agent mode

class JobScript:
    """What this node answers to `apply` (``--results FILE``, a JSON object; everything optional):

    ``delay`` seconds before the result (default 0.1); ``skip``: never send one; ``states``: per
    state id, fields merged into that state's generated result; ``results`` / ``summary``: replace
    the generated ones outright (anything at all: NaN, strings, lists of garbage); ``body``: fields
    merged into the job_result body (e.g. another ``job``); ``progress``: send a job_progress per
    state first; ``ack``: the answer to `apply` itself (default ``{"accepted": true, "job": ...}``;
    one that does not accept sends no result); ``ping_refused``: answer every ping with `refused`
    and this reason.
    """

    def __init__(self, spec: dict | None) -> None:
        self.spec = spec or {}

    def result_body(self, job_id, states) -> dict:
        results = []
        overrides = self.spec.get("states") or {}
        for index, state in enumerate(states if isinstance(states, list) else []):
            if not isinstance(state, dict):
                continue
            res = {"id": state.get("id"), "fun": state.get("fun"), "name": state.get("name"), "result": True,
                   "changes": {}, "comment": "hostile: pretended to run it", "status": "ok",
                   "duration_ms": 0.1, "source": state.get("source")}
            if state.get("sensitive"):
                res["sensitive"] = True
            res.update(overrides.get(str(state.get("id")), {}))
            results.append(res)
        summary = {"ok": 0, "changed": 0, "failed": 0, "not_run": 0, "skipped": 0}
        for res in results:
            summary[res.get("status", "ok")] = summary.get(res.get("status", "ok"), 0) + 1
        now = time.time()
        body = {"job": job_id, "results": results, "summary": summary, "started": now - 0.2, "finished": now,
                "test": False, "interrupted": False}
        if "results" in self.spec:
            body["results"] = self.spec["results"]
        if "summary" in self.spec:
            body["summary"] = self.spec["summary"]
        body.update(self.spec.get("body") or {})
        return body


class HostileAgent:
    def __init__(self, args) -> None:
        self.args = args
        self.host, self.port = pconfig.parse_address(args.master)
        if args.id_json is not None:
            self.node_id = json.loads(args.id_json)
        else:
            self.node_id = args.id
        self.facts = load_json(args.facts, {}) if args.facts else {"hostname": str(self.node_id)[:60]}
        self.catalog = load_json(args.catalog) if args.catalog else default_catalog()
        self.script = JobScript(load_json(args.results, {}))
        self.send_after_enroll = load_json(args.send, []) or []
        self.commands_offset = 0
        self.record_path = args.record
        self.ctx = zmq.Context()
        self.status = "connecting"
        self.pending_results: list[tuple[float, dict]] = []
        self.sent_script = False
        self.last_beat = time.monotonic()

    # ---- output
    def record(self, entry: dict) -> None:
        if self.record_path:
            with open(self.record_path, "a") as fh:
                fh.write(to_json(dict(entry, t=time.time())) + "\n")

    def send(self, msg: Message) -> None:
        self.sock.send(msgpack.packb({"v": msg.v, "type": msg.type, "id": msg.id, "ts": msg.ts, "exp": msg.exp,
                                      "reply_to": msg.reply_to, "body": msg.body}, use_bin_type=True))

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def enroll(self, overrides: dict | None = None, quiet: bool = False) -> None:
        overrides = overrides or {}
        body = {"id": overrides.get("id", self.node_id), "facts": overrides.get("facts", self.facts),
                "catalog": self.catalog}
        token = overrides.get("token", self.args.token)
        if token is not None:
            body["token"] = token
        self.send(Message(type=proto.ENROLL, body=body))
        if not quiet:
            say(f"sent enroll as {body['id']!r}{' with a token' if token else ''}")

    # ---- scripted messages
    def run_item(self, item: dict) -> None:
        if not isinstance(item, dict):
            say(f"ignored scripted item {item!r}")
            return
        if "sleep" in item:
            time.sleep(float(item["sleep"]))
            return
        repeat = int(item.get("repeat", 1))
        if item.get("enroll"):
            for _ in range(repeat):
                self.enroll({k: untag(item[k]) for k in ("id", "facts", "token") if k in item}, quiet=repeat > 1)
            if repeat > 1:
                say(f"sent {repeat} enrollments")
            return
        if "raw_b64" in item or "raw_msgpack" in item or "frames_b64" in item:
            if "frames_b64" in item:
                frames = [base64.b64decode(f) for f in item["frames_b64"]]
            elif "raw_b64" in item:
                frames = [base64.b64decode(item["raw_b64"])]
            else:
                frames = [msgpack.packb(untag(item["raw_msgpack"]), use_bin_type=True)]
            for _ in range(repeat):
                self.send_raw(frames)
            say(f"sent {repeat} raw message(s) of {sum(map(len, frames))} bytes")
            return
        body = untag(item.get("body") or {})
        envelope = untag(item.get("envelope") or {})
        packed = b""
        for _ in range(repeat):
            raw = {"v": proto.VERSION, "type": item.get("type"), "id": os.urandom(16).hex(), "ts": time.time(),
                   "exp": item.get("exp"), "reply_to": item.get("reply_to"), "body": body}
            raw.update(envelope)
            packed = msgpack.packb(raw, use_bin_type=True)
            self.sock.send(packed)
        say(f"sent {repeat} {item.get('type')!r} message(s), {len(packed)} bytes each")

    def poll_commands(self) -> None:
        path = self.args.commands
        if not path or not os.path.exists(path):
            return
        with open(path) as fh:
            fh.seek(self.commands_offset)
            data = fh.read()
        if not data.endswith("\n"):
            data = data[:data.rfind("\n") + 1]
        self.commands_offset += len(data.encode())
        for line in data.splitlines():
            if line.strip():
                self.run_item(json.loads(line))

    # ---- messages from the master
    def on_frame(self, frames: list[bytes]) -> None:
        try:
            msg = proto.decode(frames[-1], proto.MASTER_TO_AGENT)
        except proto.ProtocolError as exc:
            self.record({"type": "undecodable", "error": str(exc), "bytes": len(frames[-1])})
            say(f"undecodable frame from the master: {exc}")
            return
        self.record({"type": msg.type, "id": msg.id, "reply_to": msg.reply_to, "body": msg.body})
        if msg.type == proto.ENROLLED:
            status = msg.body.get("status")
            if status != self.status:
                say(f"enrolled: status {status!r}")
            self.status = status
            if status == "deleted":
                self.enroll()
        elif msg.type == proto.PING and "ping_refused" in self.script.spec:
            self.send(proto.reply(msg, proto.REFUSED, {"reason": untag(self.script.spec["ping_refused"])}))
        elif msg.type == proto.PING:
            self.send(proto.reply(msg, proto.RESULT, {
                "time": time.time(), "uptime_s": 4242.0, "load": [0.01, 0.02, 0.03], "temp_c": 42.0,
                "disk_root_used_pct": 12.5, "disk_root_free_mb": 10000}))
        elif msg.type == proto.FACTS:
            self.send(proto.reply(msg, proto.RESULT, self.facts))
        elif msg.type == proto.APPLY:
            job_id = msg.body.get("job")
            states = msg.body.get("states")
            ack = untag(self.script.spec["ack"]) if "ack" in self.script.spec else {"accepted": True, "job": job_id}
            self.send(proto.reply(msg, proto.RESULT, ack))
            count = len(states) if isinstance(states, list) else "?"
            say(f"apply {job_id}: {count} state(s), redact list of {len(msg.body.get('redact') or [])}")
            if not self.script.spec.get("skip") and isinstance(ack, dict) and ack.get("accepted") is True:
                due = time.monotonic() + float(self.script.spec.get("delay", 0.1))
                self.pending_results.append((due, {"job": job_id, "states": states}))
        elif msg.type == proto.JOB_RESULT_ACK:
            say(f"result of {msg.body.get('job')} acknowledged")

    def deliver_due_results(self) -> None:
        now = time.monotonic()
        due = [p for p in self.pending_results if p[0] <= now]
        self.pending_results = [p for p in self.pending_results if p[0] > now]
        for _, job in due:
            body = self.script.result_body(job["job"], job["states"])
            if self.script.spec.get("progress"):
                for index, res in enumerate(body["results"] if isinstance(body["results"], list) else []):
                    state = {k: res.get(k) for k in ("id", "fun", "status")} if isinstance(res, dict) else res
                    self.send(Message(type=proto.JOB_PROGRESS, body={"job": job["job"], "index": index,
                                                                      "state": state}))
            self.send(Message(type=proto.JOB_RESULT, body=body))
            say(f"sent the result of {job['job']}: summary {body.get('summary')!r}")

    # ---- life
    def run(self) -> int:
        master_key = fetch_master_key(self.ctx, self.host, self.port + 1)
        keypair = load_or_make_key(self.args.key)
        say(f"hostile agent {self.node_id!r}, key {keys.fingerprint(keypair[0])}, "
            f"master {keys.fingerprint(master_key)}")
        self.sock = curve_dealer(self.ctx, master_key, keypair, self.host, self.port)
        if not self.args.no_enroll:
            self.enroll()
        enrolled_at = time.monotonic()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not STOP:
            events = dict(poller.poll(50))
            if self.sock in events:
                for _ in range(1000):
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.on_frame(frames)
            if not self.sent_script and (self.status != "connecting" or time.monotonic() - enrolled_at > 3):
                self.sent_script = True
                for item in self.send_after_enroll:
                    self.run_item(item)
            self.poll_commands()
            self.deliver_due_results()
            if self.status == proto.ACCEPTED and time.monotonic() - self.last_beat > 10:
                self.last_beat = time.monotonic()
                self.send(Message(type=proto.HEARTBEAT))
        say("stopping (SIGTERM)")
        self.sock.close(0)
        self.ctx.destroy(linger=0)
        return 0


# ---------------------------------------------------------------------------------------------
# flood mode

def big_frame(size: int, shape: str) -> bytes:
    """``size`` bytes of msgpack that decode into as many empty maps as fit."""
    if shape == "array":
        count = size - 5
        return b"\xdd" + struct.pack(">I", count) + b"\x80" * count
    # An enrollment (the one type an unknown key may send) whose facts are the maps.
    head = msgpack.packb({"v": proto.VERSION, "type": proto.ENROLL, "id": os.urandom(16).hex(), "ts": time.time(),
                          "exp": None, "reply_to": None}, use_bin_type=True)
    # Rewrite the fixmap header (6 entries) to 7 and append "body": {"id": .., "facts": {"junk": [...]}}
    head = bytes([head[0] + 1]) + head[1:]
    prefix = head + msgpack.packb("body") + b"\x82" + msgpack.packb("id") + msgpack.packb("flood-big") + \
        msgpack.packb("facts") + b"\x81" + msgpack.packb("junk")
    count = size - len(prefix) - 5
    return prefix + b"\xdd" + struct.pack(">I", count) + b"\x80" * count


def run_flood(args) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port = pconfig.parse_address(args.master)
    ctx = zmq.Context()
    ctx.max_sockets = 100000
    master_key = fetch_master_key(ctx, host, port + 1)
    summary = {"mode": args.mode, "keys": args.keys, "answers": {}, "handshakes": 0, "disconnects": 0}
    started = time.monotonic()
    if args.mode == "big":
        frame = big_frame(args.bytes, args.shape)
        socks = []
        for _ in range(args.keys):
            sock = curve_dealer(ctx, master_key, zmq.curve_keypair(), host, port, reconnect=False)
            sock.linger = 60000
            sock.send(frame)
            socks.append(sock)
        say(f"flood: {args.keys} frame(s) of {len(frame)} bytes queued on {args.keys} fresh keys")
        time.sleep(args.hold or 0)
        for sock in socks:
            sock.close()
        ctx.term()  # returns once every frame is written (or after the linger)
        summary["frame_bytes"] = len(frame)
    elif args.mode == "enroll":
        facts = {"hostname": "flood", "junk": "x" * args.facts_bytes}
        done = 0
        while done < args.keys and not STOP:
            batch = []
            for i in range(done, min(args.keys, done + args.batch)):
                sock = curve_dealer(ctx, master_key, zmq.curve_keypair(), host, port, reconnect=False)
                body = {"id": f"{args.id_prefix}{i:04d}", "facts": facts, "catalog": {}}
                if args.token:
                    body["token"] = args.token
                sock.send(proto.encode(Message(type=proto.ENROLL, body=body)))
                batch.append(sock)
            deadline = time.monotonic() + args.wait
            waiting = list(batch)
            while waiting and time.monotonic() < deadline:
                poller = zmq.Poller()
                for sock in waiting:
                    poller.register(sock, zmq.POLLIN)
                for sock, _ in poller.poll(200):
                    try:
                        status = proto.decode(sock.recv(), proto.MASTER_TO_AGENT).body.get("status")
                    except proto.ProtocolError:
                        status = "undecodable"
                    summary["answers"][str(status)] = summary["answers"].get(str(status), 0) + 1
                    waiting.remove(sock)
            summary["answers"]["none"] = summary["answers"].get("none", 0) + len(waiting)
            for sock in batch:
                sock.close(0)
            done += len(batch)
        say(f"flood: {done} enrollments sent, answers {summary['answers']}")
    elif args.mode == "idle":
        socks, monitors = [], []
        for _ in range(args.keys):
            sock = curve_dealer(ctx, master_key, zmq.curve_keypair(), host, port, reconnect=args.reconnect)
            monitors.append(sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED |
                                                    zmq.EVENT_CLOSED))
            socks.append(sock)
        poller = zmq.Poller()
        for mon in monitors:
            poller.register(mon, zmq.POLLIN)
        reported = False
        end = time.monotonic() + args.hold if args.hold else math.inf
        while not STOP and time.monotonic() < end:
            for mon, _ in poller.poll(200):
                while mon.poll(0):
                    event = struct.unpack("=hi", mon.recv_multipart()[0][:6])[0]
                    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        summary["handshakes"] += 1
                    else:
                        summary["disconnects"] += 1
            if not reported and (summary["handshakes"] >= args.keys or time.monotonic() - started > 20):
                reported = True
                say(f"flood: idle sessions ready: {summary['handshakes']} handshakes of {args.keys}")
        for sock in socks:
            sock.close(0)
        for mon in monitors:
            mon.close(0)
        ctx.destroy(linger=0)
    summary["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps({"flood": summary}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hostile_agent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode_name", required=True)
    agent = sub.add_parser("agent", help="one hostile node")
    agent.add_argument("--master", required=True, help="HOST:PORT of the master's CURVE port")
    agent.add_argument("--id", default="hostile01")
    agent.add_argument("--id-json", help="the node id as JSON (any value: '\"good01\\n\"', 7, null)")
    agent.add_argument("--token")
    agent.add_argument("--facts", help="JSON file: the facts to report (default: just a hostname)")
    agent.add_argument("--catalog", help="JSON file: the state catalogue (default: piagent's real one)")
    agent.add_argument("--key", help="secret key file: loaded if it exists, else made and saved there")
    agent.add_argument("--record", help="JSON lines file: every message received")
    agent.add_argument("--results", help="JSON file: how to answer apply (see JobScript)")
    agent.add_argument("--send", help="JSON file: a list of messages to send once enrollment is answered")
    agent.add_argument("--commands", help="JSON lines file: more messages to send, appended at any time")
    agent.add_argument("--no-enroll", action="store_true", help="connect but never enroll")
    flood = sub.add_parser("flood", help="many fresh keys")
    flood.add_argument("--master", required=True)
    flood.add_argument("--mode", choices=("big", "enroll", "idle"), required=True)
    flood.add_argument("--keys", type=int, default=1)
    flood.add_argument("--bytes", type=int, default=16 * 1024 * 1024 - 64)
    flood.add_argument("--shape", choices=("array", "enroll"), default="array")
    flood.add_argument("--facts-bytes", type=int, default=100 * 1000)
    flood.add_argument("--token")
    flood.add_argument("--id-prefix", default="flood")
    flood.add_argument("--batch", type=int, default=50, help="enroll mode: sessions open at once")
    flood.add_argument("--wait", type=float, default=3.0, help="enroll mode: seconds to wait for each batch's answers")
    flood.add_argument("--hold", type=float, default=0.0, help="idle mode: seconds to stay (default: until SIGTERM)")
    flood.add_argument("--reconnect", action="store_true", help="idle mode: let libzmq reconnect dropped sessions")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    if args.mode_name == "agent":
        return HostileAgent(args).run()
    return run_flood(args)


if __name__ == "__main__":
    sys.exit(main())
