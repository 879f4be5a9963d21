"""Hostile peers: ids that are almost right, frames that are small on the wire and huge in memory,
and the master an agent trusts when nothing pins it.

- every id pattern is a full match: "good01\\n" is refused as a node id, job id, fingerprint,
  secret name or state argument;
- proto.decode bounds what one frame may unpack into (size before unpacking, string/array/map
  lengths, extension types, and the number of arrays and maps), on the master's msgpack and on
  bookworm's msgpack 1.0.3 (the test_decode_* checks also run as a script under Debian's python3);
- trust on first use is a WARNING naming the key, and `piagent trust` pins the master instead;
- the agent drops a malformed request from its master with one log line, never a traceback.

Run as a script (`python3 tests/test_wire_limits.py`, with piagent importable) it runs the
test_decode_* checks only: that is how they run on bookworm's python3, which has no pytest.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack

from harness import agent_python, agent_with_standin_master, source_path, wait_for

try:
    import pytest
except ImportError:  # run as a script by Debian's python3: only the test_decode_* checks below
    pytest = None

from piagent import config as pconfig  # noqa: E402 (after the pytest import, on purpose)
from piagent import protocol as proto  # noqa: E402
from piagent.protocol import Message  # noqa: E402

FINGERPRINT = "sha256:" + "ab" * 32
OTHER_FINGERPRINT = "sha256:" + "0" * 64


def _refused(frame, allowed=proto.AGENT_TO_MASTER, **kwargs) -> str:
    try:
        proto.decode(frame, allowed, **kwargs)
    except proto.ProtocolError as exc:
        return str(exc)
    raise AssertionError("decode() accepted a frame it must refuse")


def _envelope(body_bytes: bytes, type_: str = proto.RESULT) -> bytes:
    """A valid envelope around an already packed body (so tests can build bodies byte by byte)."""
    head = {"v": proto.VERSION, "type": type_, "id": "a1", "ts": time.time(), "exp": None, "reply_to": None}
    return b"\x87" + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in head.items()) \
        + msgpack.packb("body") + body_bytes


def _empty_maps_frame(size: int = proto.MAX_MESSAGE_BYTES) -> bytes:
    """A valid envelope whose body holds as many empty maps (one byte each) as fit in ``size``."""
    n = proto.MAX_CONTAINER_LEN  # arrays as long as allowed: only the count of maps can refuse it
    inner = b"\xdc" + struct.pack(">H", n) + b"\x80" * n  # array16 of n empty maps
    head = _envelope(b"")
    count = (size - len(head) - 16) // len(inner)
    return _envelope(b"\x81" + msgpack.packb("x") + b"\xdc" + struct.pack(">H", count) + inner * count)


# ---------------------------------------------------------------------------------------------
# Decoding: plain functions (no fixtures), run by pytest and as a script under Debian's python3

def test_decode_refuses_a_frame_over_max_bytes_before_unpacking():
    body = {"id": "n1", "facts": {"pad": "x" * (65 * 1024)}}
    frame = proto.encode(Message(type=proto.ENROLL, body=body))
    assert 65 * 1024 < len(frame) < 66 * 1024
    assert proto.decode(frame, proto.UNAUTHENTICATED_ALLOWED).body == body  # the default limit: 16 MiB
    reason = _refused(frame, proto.UNAUTHENTICATED_ALLOWED, max_bytes=proto.MAX_UNAUTHENTICATED_BYTES)
    assert f"exceeds the {proto.MAX_UNAUTHENTICATED_BYTES}-byte limit" in reason
    # Refused for its size, not for what is in it: 65 KiB of garbage gets the same answer.
    garbage = b"\xc1" * (65 * 1024)
    assert "byte limit" in _refused(garbage, max_bytes=proto.MAX_UNAUTHENTICATED_BYTES)
    assert "not a msgpack message" in _refused(garbage)
    # An enrollment (a few KiB with facts and catalog) fits the unauthenticated limit easily.
    small = proto.encode(Message(type=proto.ENROLL, body={"id": "n1", "facts": {"pad": "x" * 30000}}))
    assert proto.decode(small, proto.UNAUTHENTICATED_ALLOWED, max_bytes=proto.MAX_UNAUTHENTICATED_BYTES)
    assert proto.MAX_UNAUTHENTICATED_BYTES == 64 * 1024


def test_decode_counts_arrays_and_maps():
    fine = proto.encode(Message(type=proto.RESULT, body={"x": [[{}] * 10_000] * 15}))
    assert sum(map(len, proto.decode(fine, proto.AGENT_TO_MASTER).body["x"])) == 150_000
    too_many = proto.encode(Message(type=proto.RESULT, body={"x": [[{}] * 10_000] * 25}))
    assert f"more than {proto.MAX_CONTAINERS} arrays and maps" in _refused(too_many)
    lists = proto.encode(Message(type=proto.RESULT, body={"x": [[[]] * 15_000] * 16}))
    assert "arrays and maps" in _refused(lists)
    assert "arrays and maps" in _refused(_empty_maps_frame(4 * 1024 * 1024))


def test_decode_bounds_one_array_or_map():
    at_limit = proto.encode(Message(type=proto.RESULT, body={"x": [0] * proto.MAX_CONTAINER_LEN}))
    assert len(proto.decode(at_limit, proto.AGENT_TO_MASTER).body["x"]) == proto.MAX_CONTAINER_LEN
    over = proto.encode(Message(type=proto.RESULT, body={"x": [0] * (proto.MAX_CONTAINER_LEN + 1)}))
    assert "not a msgpack message" in _refused(over)
    wide = proto.encode(Message(type=proto.RESULT, body={str(i): 0 for i in range(proto.MAX_CONTAINER_LEN + 1)}))
    assert "not a msgpack message" in _refused(wide)
    # Headers that claim more than is there, nested as deep as msgpack goes: refused, nothing else.
    for depth in (10, 1000, 2000):
        assert _refused(_envelope((b"\xdc\xff\xff") * depth))
        assert _refused(_envelope((b"\xde\xff\xff\xa1k") * depth))
    assert _refused(_envelope(b"\xdd\xff\xff\xff\xff"))  # array32 claiming 4 G elements


def test_decode_refuses_extension_types_and_timestamps():
    # msgpack decodes its timestamp extension (-1) itself, without asking ext_hook.
    stamped = msgpack.packb({"v": 1, "type": proto.RESULT, "id": "a", "ts": 1.0, "exp": None, "reply_to": None,
                             "body": {"t": msgpack.Timestamp(5)}})
    assert _refused(stamped)
    assert _refused(_envelope(b"\x81\xa1t" + msgpack.packb(msgpack.ExtType(5, b"abc"))))
    assert _refused(_envelope(b"\x81\xa1t\xc7\x00\x05"))  # ext8 of length 0


def test_decode_takes_bytes_bytearray_and_memoryview_and_reports_briefly():
    frame = proto.encode(proto.request(proto.PING))
    for data in (frame, bytearray(frame), memoryview(frame)):
        assert proto.decode(data, proto.MASTER_TO_AGENT).type == proto.PING
    # A peer's 1 MiB "version" is not copied into the log line.
    huge = msgpack.packb({"v": "x" * (1 << 20), "type": proto.PING, "id": "a", "ts": 1.0, "exp": 2.0,
                          "reply_to": None, "body": {}})
    assert len(_refused(huge, proto.MASTER_TO_AGENT)) < 200


DECODE_CHECKS = [value for name, value in sorted(globals().items()) if name.startswith("test_decode_")]


def _interpreters() -> list[str]:
    return list(dict.fromkeys([sys.executable, agent_python()]))


def test_the_decode_checks_pass_under_the_agents_python(tmp):
    """The same test_decode_* checks as a script under AGENT_PYTHON (Debian's python3, msgpack 1.0.3)."""
    python = agent_python()
    result = subprocess.run([python, __file__], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=f"{source_path(tmp)}:{Path(__file__).parent}"))
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    assert f"{len(DECODE_CHECKS)} decode checks passed" in result.stdout
    if python == "/usr/bin/python3":
        assert "msgpack 1.0.3" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------
# Memory: 16 MiB of empty maps, measured in a fresh process (ru_maxrss), before and after

MEMORY_PROBE = r"""
import json, resource, sys, time, tracemalloc
import msgpack
sys.path.insert(0, sys.argv[2])
import test_wire_limits as t
from piagent import protocol as proto
frame = t._empty_maps_frame()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
traced = sys.argv[1] == "after"  # tracing 16 M allocations of `before` would cost more than they do
if traced:
    tracemalloc.start()
started = time.perf_counter()
try:
    if sys.argv[1] == "before":  # what decode() asked of msgpack before it bounded containers
        msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=proto.MAX_MESSAGE_BYTES,
                        max_str_len=proto.MAX_MESSAGE_BYTES)
    else:
        proto.decode(frame, proto.AGENT_TO_MASTER)
    outcome = "decoded"
except proto.ProtocolError as exc:
    outcome = "ProtocolError: " + str(exc)
seconds = time.perf_counter() - started
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
peak = tracemalloc.get_traced_memory()[1] / 2**20 if traced else None
print(json.dumps({"msgpack": ".".join(map(str, msgpack.version)), "frame_mib": round(len(frame) / 2**20, 2),
                  "outcome": outcome, "rss_grew_mib": round(grew, 1),
                  "traced_peak_mib": None if peak is None else round(peak, 1), "seconds": round(seconds, 2)}))
"""


def _available_mib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _probe(python: str, mode: str, tmp: Path) -> dict:
    result = subprocess.run([python, "-c", MEMORY_PROBE, mode, str(Path(__file__).parent)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=source_path(tmp)))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_16_mib_frame_of_empty_maps_is_refused_in_bounded_memory(tmp):
    for python in _interpreters():
        after = _probe(python, "after", tmp)
        print(f"{python}: after: {after}")
        assert after["frame_mib"] > 15.9
        assert after["outcome"].startswith("ProtocolError") and "arrays and maps" in after["outcome"], after
        assert after["rss_grew_mib"] < 64 and after["traced_peak_mib"] < 64, after
        if _available_mib() < 3000:
            print("(not measuring `before`: it needs ~1.2 GiB and less than 3 GiB is available)")
            continue
        before = _probe(python, "before", tmp)
        print(f"{python}: before: {before}")
        assert before["outcome"] == "decoded" and before["rss_grew_mib"] > 10 * max(after["traced_peak_mib"], 16), before


# ---------------------------------------------------------------------------------------------
# Full matches: "good01\n" is not an id anywhere

def test_ids_with_a_trailing_newline_are_refused_everywhere(tmp):
    import logging

    from piagent.config import FINGERPRINT_RE, ConfigError, validate_fingerprint, validate_node_id
    from piagent.jobs import JOB_ID_RE, JobRunner
    from piagent.states import host, kmod, network, pkg, service, sysctl
    from pimaster.secrets import NAME_RE, SecretError, SecretStore

    # Node ids (the agent's config and the master's enrollment check, which uses NODE_ID_RE.match).
    assert validate_node_id("good01") == "good01"
    with pytest.raises(ConfigError):
        validate_node_id("good01\n")
    assert pconfig.NODE_ID_RE.match("good01\n") is None and pconfig.NODE_ID_RE.search("good01\n") is None

    # Job ids: refused in an apply, and an acknowledgement cannot name a file that is not a job's.
    runner = JobRunner(str(tmp), lambda msg: None, logging.getLogger("test"))
    assert runner.accept({"job": "good01\n", "states": []}) == {"error": "malformed job id"}
    assert JOB_ID_RE.match("good01\n") is None
    (tmp / "results").mkdir()
    odd = tmp / "results" / "good01\n.json"
    odd.write_text("{}")
    runner.acknowledged("good01\n")
    assert odd.exists()

    # Fingerprints: piagent.conf, `piagent trust` and its file.
    assert validate_fingerprint(FINGERPRINT) == FINGERPRINT
    for bad in (FINGERPRINT + "\n", FINGERPRINT + " ", " " + FINGERPRINT, "sha256:abc", ""):
        with pytest.raises(ConfigError):
            validate_fingerprint(bad)
    assert FINGERPRINT_RE.match(FINGERPRINT + "\n") is None

    # Secret names on the master (a file name in its state dir).
    store = SecretStore(str(tmp / "m"))
    with pytest.raises(SecretError):
        store.get("good01\n")
    assert NAME_RE.match("good01\n") is None
    assert len(store.get("good01")) == 64
    (tmp / "m" / "secrets" / "other\n").write_text("x" * 20)
    assert set(store.values()) == {"good01"}

    # The state modules' argument checks (values written into system files or passed to commands).
    for pattern, good in ((sysctl.KEY_RE, "net.ipv4.ip_forward"), (service.UNIT_RE, "ssh.service"),
                          (pkg.PACKAGE_RE, "nginx"), (pkg.VERSION_RE, "1.2-3"), (host.LABEL_RE, "node01"),
                          (host.HOSTS_NAME_RE, "node01.lan"), (kmod.MODULE_RE, "br_netfilter"),
                          (network.IFACE_RE, "eth0")):
        assert pattern.match(good), (pattern.pattern, good)
        assert pattern.match(good + "\n") is None, pattern.pattern


def test_a_result_the_master_would_refuse_goes_without_its_details(tmp):
    """A job result within 16 MiB but over decode()'s array limit would be refused by the master at
    every delivery (and kept, and resent): the agent sends the verdicts without the changes."""
    import asyncio
    import logging

    from piagent.jobs import JobRunner

    sent = []

    async def send(msg):
        sent.append(msg)
        return True

    runner = JobRunner(str(tmp), send, logging.getLogger("test"))
    changes = {"lines": ["x"] * (proto.MAX_CONTAINER_LEN + 1)}
    asyncio.run(runner._deliver({"job": "j1", "summary": {"changed": 1},
                                 "results": [{"id": "a", "fun": "cmd.run", "status": "changed", "changes": changes}]}))
    (msg,) = sent
    assert proto.decode(proto.encode(msg), proto.AGENT_TO_MASTER).body["results"][0]["status"] == "changed"
    assert "too large" in msg.body["results"][0]["changes"]["note"]


# ---------------------------------------------------------------------------------------------
# Trust on first use, and `piagent trust` (real agent processes on Debian's python3)

def piagent(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([agent_python(), "-m", "piagent", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=source_path(tmp)))


def unpinned(config: str) -> str:
    return "".join(line for line in config.splitlines(True) if not line.startswith("fingerprint"))


def test_first_contact_is_trusted_with_a_warning_naming_the_key(tmp, master, start_agent):
    master_fp = master.cli("keys", "fingerprint").stdout.strip()
    agent = start_agent("n1", unpinned(master.token_config(token=False)))
    wait_for(lambda: master.key_state("n1") == ["pending"], what="n1 pending")
    (line,) = [l for l in agent.output().splitlines() if "TRUSTING the master" in l]
    assert "WARNING" in line and master_fp in line and master.address in line, line
    assert "now controls this node" in line and "piagent trust FINGERPRINT" in line, line

    status = piagent(tmp, "trust", "--state-dir", str(agent.state_dir), "--config", str(agent.config_path))
    assert status.returncode == 0 and "trusted on first contact" in status.stdout, status
    assert master_fp in status.stdout

    # Once: a restart trusts the cached key without a new warning (and says it is not pinned).
    agent.stop()
    agent.start()
    wait_for(lambda: agent.output().count("waiting for a person to accept") == 2, what="n1 back as pending")
    assert agent.output().count("TRUSTING the master") == 1
    assert "not pinned: trusting " + master_fp in agent.output()


def test_piagent_trust_pins_the_master_and_the_agent_refuses_another(tmp, master, start_agent):
    master_fp = master.cli("keys", "fingerprint").stdout.strip()
    config = unpinned(master.token_config(token=False))

    # A node that trusted this master at first contact, then is pinned to another one.
    agent = start_agent("n1", config)
    wait_for(lambda: master.key_state("n1") == ["pending"], what="n1 pending")
    agent.stop()
    state = ["--state-dir", str(agent.state_dir), "--config", str(agent.config_path)]
    pinned = piagent(tmp, "trust", OTHER_FINGERPRINT, *state)
    assert pinned.returncode == 0, pinned
    assert (agent.state_dir / "master.fingerprint").read_text() == OTHER_FINGERPRINT + "\n"
    assert "another key" in pinned.stdout and master_fp in pinned.stdout, pinned.stdout  # it says so
    status = piagent(tmp, "trust", *state)
    assert status.returncode == 0 and "pinned by `piagent trust`" in status.stdout and OTHER_FINGERPRINT in status.stdout
    assert "refuses it" in status.stdout, status.stdout
    agent.start()
    wait_for(lambda: "REFUSING the master" in agent.output(), what="agent refuses loudly")
    refusal = next(l for l in agent.output().splitlines() if "REFUSING the master" in l)
    assert "CRITICAL" in refusal and f"pinned to {OTHER_FINGERPRINT} by `piagent trust`" in refusal, refusal
    assert agent.output().count("waiting for a person to accept") == 1  # never talked to it again

    # A fresh node pinned before its first contact never enrolls with another master...
    fresh = tmp / "agent-n2"
    assert piagent(tmp, "trust", OTHER_FINGERPRINT, "--state-dir", str(fresh)).returncode == 0
    n2 = start_agent("n2", config)
    wait_for(lambda: "REFUSING the master" in n2.output(), what="n2 refuses")
    assert master.key_state("n2") == []
    assert "TRUSTING" not in n2.output()
    # ...and pinned to the right one, it enrolls without trusting anything on first contact.
    n2.stop()
    assert piagent(tmp, "trust", master_fp, "--state-dir", str(fresh)).returncode == 0
    n2.start()
    wait_for(lambda: master.key_state("n2") == ["pending"], what="n2 pending")
    assert "TRUSTING" not in n2.output()
    assert "pinned to " + master_fp in n2.output()


def test_piagent_trust_refuses_a_malformed_fingerprint(tmp):
    state = tmp / "state"
    for bad in (FINGERPRINT + "\n", FINGERPRINT + " ", "\t" + FINGERPRINT, "sha256:abc", "md5:" + "0" * 32,
                "sha256:" + "g" * 64, ""):
        result = piagent(tmp, "trust", bad, "--state-dir", str(state))
        assert result.returncode == 2, (bad, result)
        assert "is not a master fingerprint" in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (state / "master.fingerprint").exists()


def test_config_and_trust_must_agree_and_a_mangled_trust_file_stops_the_agent(tmp):
    state = tmp / "state"
    conf = tmp / "n1.conf"
    conf.write_text(pconfig.render_config("127.0.0.1:9", FINGERPRINT, None))
    run = ["run", "--config", str(conf), "--id", "n1", "--state-dir", str(state)]
    assert piagent(tmp, "trust", FINGERPRINT, "--state-dir", str(state), "--config", str(conf)).returncode == 0
    # `piagent trust` will not pin another master than the config's...
    refused = piagent(tmp, "trust", OTHER_FINGERPRINT, "--state-dir", str(state), "--config", str(conf))
    assert refused.returncode == 1 and "must agree" in refused.stderr, refused
    # ...and if the two disagree anyway, the agent does not start.
    (state / "master.fingerprint").write_text(OTHER_FINGERPRINT + "\n")
    result = piagent(tmp, *run)
    assert result.returncode == 2 and "must agree" in result.stderr and "Traceback" not in result.stderr, result
    assert "CONFLICT" in piagent(tmp, "trust", "--state-dir", str(state), "--config", str(conf)).stdout
    # A trust file that is not a fingerprint never means "trust whoever answers".
    (state / "master.fingerprint").write_text("sha256:oops\n")
    result = piagent(tmp, *run)
    assert result.returncode == 2 and "does not hold a master fingerprint" in result.stderr, result


# ---------------------------------------------------------------------------------------------
# The agent: a malformed request from its master is one line in the log, never a traceback

def test_agent_drops_malformed_requests_with_one_line(tmp):
    with agent_with_standin_master(tmp) as (agent, router, ident):
        def ask(body: dict) -> dict:
            request = proto.request(proto.APPLY, body)
            router.send_multipart([ident, proto.encode(request)])
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if router.poll(500):
                    msg = proto.decode(router.recv_multipart()[1], proto.AGENT_TO_MASTER)
                    if msg.reply_to == request.id:
                        return msg.body
            raise AssertionError(agent.output())

        assert ask({"job": "good01\n", "states": []}) == {"error": "malformed job id"}
        bad_states = [
            ([{"fun": "cmd.run", "name": "true", "args": [1, 2]}], "args is not a map of names"),
            ([{"fun": "cmd.run", "name": "true", "require": 5}], "require is not a list of positions"),
            ([{"fun": "cmd.run", "name": ["true"]}], "name is not text"),
            ([{"fun": "cmd.run", "name": "true", "unless": 3}], "unless is not a command"),
            (["cmd.run"], "not a map"),
        ]
        for states, reason in bad_states:
            answer = ask({"job": "j1", "states": states})
            assert reason in answer.get("error", ""), (reason, answer)
        # Garbage the master's clock could be set to, and 16 MiB of empty maps: dropped too.
        for time_value in (float("nan"), float("inf"), True):
            router.send_multipart([ident, proto.encode(Message(type=proto.HEARTBEAT_ACK, body={"time": time_value}))])
        router.send_multipart([ident, _empty_maps_frame()])
        wait_for(lambda: "arrays and maps" in agent.output(), what="the agent drops the bomb")
        assert ask({"job": "j2", "states": []}).get("accepted") is True  # still at work
        log = agent.output()
        assert log.count("refused a job") == len(bad_states) + 1
        assert "dropped a malformed message from the master: more than" in log
        assert "Traceback" not in log, log


if __name__ == "__main__":
    for check in DECODE_CHECKS:
        check()
        print(f"ok {check.__name__}")
    print(f"{len(DECODE_CHECKS)} decode checks passed (python {sys.version.split()[0]}, "
          f"msgpack {'.'.join(map(str, msgpack.version))})")
