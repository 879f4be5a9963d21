"""Abuse: secrets stay secret, the control socket is the owner's alone, denied keys get nothing."""

import json
import os
import pwd
import shutil
import stat
import subprocess
import textwrap
import time

import pytest
import zmq

from harness import source_path, wait_for
from piagent import protocol as proto
from piagent.protocol import Message


def all_bytes_under(path) -> bytes:
    data = b""
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if os.path.isfile(full) and not stat.S_ISSOCK(os.stat(full).st_mode):
                with open(full, "rb") as fh:
                    data += fh.read()
    return data


def test_enrollment_tokens_never_reach_the_database_logs_or_outputs(tmp, master, start_agent):
    config = master.token_config(uses=2)
    token = config.split("token = ")[1].split()[0]
    agent = start_agent("n1", config)
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    state = tmp / "s.yaml"
    state.write_text(f"{tmp}/out:\n  file.managed:\n    - contents: hi\n")
    outputs = [master.cli(*args).stdout for args in (("apply", str(state), "--json"), ("jobs", "--json"),
                                                     ("nodes", "--json"), ("keys", "list", "--json"),
                                                     ("status", "--json"), ("ping", "--json"))]
    master.stop()  # flush everything to disk
    searched = {
        "master state dir (database, WAL, keys)": all_bytes_under(master.state_dir),
        "master log": master.log_path.read_bytes(),
        "agent log": agent.log_path.read_bytes(),
        "command outputs and --json": "".join(outputs).encode(),
    }
    found = {where: data.count(token.encode()) for where, data in searched.items()}
    print("token occurrences:", found)
    assert sum(found.values()) == 0
    assert sum(len(d) for d in searched.values()) > 10000  # we did search something real


@pytest.fixture
def throwaway_user():
    name = "pm-test-nobody"
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user")
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=False, capture_output=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_the_control_socket_cannot_be_used_by_another_user(tmp, master, start_agent, throwaway_user):
    import sys

    start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    # The interpreter and the source must be readable by the user for it to even try.
    os.chmod(tmp, 0o755)
    pysrc = source_path(tmp)

    def as_user(*args):
        return subprocess.run(["runuser", "-u", throwaway_user.pw_name, "--", sys.executable, "-m", "pimaster",
                               *args, "--state-dir", str(master.state_dir)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=pysrc), timeout=60)

    refused = as_user("ping", "--json")
    assert refused.returncode == 3 and "permission denied" in refused.stderr, refused.stderr
    assert json.loads(refused.stdout) == {"error": refused.stderr.strip().removeprefix("pimaster: "),
                                          "code": "permission_denied"}
    # Even if someone loosens the directory and socket modes, the master checks who is calling.
    os.chmod(master.state_dir, 0o755)
    os.chmod(master.state_dir / "control.sock", 0o666)
    refused = as_user("keys", "list", "--json")
    assert refused.returncode == 3 and "permission denied" in refused.stderr, refused.stderr
    # Nothing of the master's on stdout: only the JSON error (--json's errors are JSON too).
    assert json.loads(refused.stdout) == {"error": "permission denied", "code": "permission_denied"}
    assert "refused a client with uid" in master.output()
    assert master.up_nodes() == {"n1"}  # the owner still can


def test_a_denied_key_gets_no_answers(tmp, master, start_agent):
    config = master.token_config(uses=5)
    token = config.split("token = ")[1].split()[0]
    start_agent("n1", config)
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = (master.state_dir / "master.pub").read_bytes().strip()
        sock.connect(f"tcp://127.0.0.1:{master.port}")
        answers = 0
        messages = [Message(type=proto.ENROLL, body={"id": "n1", "facts": {}, "token": token})]
        messages += [Message(type=t) for t in sorted(proto.AGENT_TO_MASTER)]
        for msg in messages:
            sock.send(proto.encode(msg))
            if sock.poll(700):
                sock.recv()
                answers += 1
        assert sorted(master.key_state("n1")) == ["accepted", "denied"]
        print(f"denied key: {len(messages)} messages sent, {answers} answered")
        assert answers == 0
    finally:
        ctx.destroy(linger=0)
