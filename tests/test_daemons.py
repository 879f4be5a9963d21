"""Master and agent daemons on 127.0.0.1: enrollment, key management, ping, reconnection, bad input.

Real processes, real CurveZMQ, real keys. The agents run on Debian's python3 packages (see harness).
"""

import json
import os
import socket
import stat
import time

import pytest

from harness import Agent, Master, wait_for


def test_enrolls_with_a_valid_token_and_answers_ping(master, start_agent):
    start_agent("n1", master.token_config(uses=2))
    wait_for(lambda: master.key_state("n1") == ["accepted"], what="n1 accepted")
    rc, data = master.ping()
    assert rc == 0
    (row,) = data["nodes"]
    assert row["id"] == "n1" and row["ok"] is True
    assert row["rtt_ms"] > 0 and "uptime_s" in row and "disk_root_used_pct" in row
    assert abs(row["clock_offset_ms"]) < 1000  # same clock on both ends here
    nodes = master.json("nodes")["nodes"]
    facts = nodes[0]["facts"]
    for fact in ("hostname", "machine_id", "cpu_count", "memory_mb", "os", "arch", "kernel", "systemd",
                 "agent_version", "macs", "ips"):
        assert fact in facts, fact
    assert facts["hostname"] == socket.gethostname()
    # This machine is not a Pi: the Pi-only facts are absent, not errors.
    assert "pi_model" not in facts and "pi_serial" not in facts


def test_agent_runs_on_bookworm_packages(master, start_agent):
    from harness import agent_python

    agent = start_agent("n1", master.token_config())
    wait_for(lambda: "starting as" in agent.output(), what="agent start-up line")
    line = next(l for l in agent.output().splitlines() if "starting as" in l)
    if agent_python() == "/usr/bin/python3":
        assert "python 3.11" in line and "pyzmq 24." in line and "msgpack 1.0.3" in line, line
    else:
        pytest.skip(f"agent ran on {agent_python()}, not Debian's python3: {line}")
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")


def test_pending_without_token_until_a_person_accepts(master, start_agent):
    agent = start_agent("n1", master.token_config(token=False))
    wait_for(lambda: master.key_state("n1") == ["pending"], what="n1 pending")
    wait_for(lambda: "waiting for a person to accept" in agent.output(), what="agent says it waits")
    rc, data = master.ping()
    assert rc != 0 and data["nodes"] == []  # a pending node is not a target
    out = master.cli("keys", "accept", "n1").stdout
    assert "accepted n1 sha256:" in out
    # Takes effect without restarting anything: the waiting agent is told at once.
    wait_for(lambda: master.up_nodes() == {"n1"}, timeout=15, what="n1 up after accept")
    assert agent.alive()


def test_rejected_key_gets_nothing(master, start_agent):
    agent = start_agent("n1", master.token_config(token=False))
    wait_for(lambda: master.key_state("n1") == ["pending"], what="n1 pending")
    master.cli("keys", "reject", "n1")
    assert master.key_state("n1") == ["rejected"]
    agent.stop()
    agent.start()  # a fresh connection: the master refuses the key at the handshake
    wait_for(lambda: "refused this agent's key" in agent.output(), what="agent told it is refused")
    rc, data = master.ping()
    assert rc != 0 and data["nodes"] == []
    assert master.json("status")["dropped_messages"] >= 1


def test_token_past_its_uses_or_ttl_enrolls_nothing(master, start_agent):
    one_use = master.token_config(uses=1)
    start_agent("n1", one_use)
    wait_for(lambda: master.key_state("n1") == ["accepted"], what="n1 accepted")
    start_agent("n2", one_use)
    wait_for(lambda: master.key_state("n2") == ["pending"], what="n2 pending (token used up)")
    short = master.token_config(uses=5, ttl="1s")
    time.sleep(1.5)
    start_agent("n3", short)
    wait_for(lambda: master.key_state("n3") == ["pending"], what="n3 pending (token expired)")
    wrong = one_use.replace(one_use.split("token = ")[1].strip(), "not-a-real-token")
    start_agent("n4", wrong)
    wait_for(lambda: master.key_state("n4") == ["pending"], what="n4 pending (wrong token)")
    time.sleep(1)
    assert master.key_state("n2") == ["pending"] and master.key_state("n3") == ["pending"]
    assert master.up_nodes() == {"n1"}


def test_agent_refuses_a_master_whose_key_does_not_match_the_pin(tmp, master, start_agent):
    config = master.token_config()
    fingerprint = config.split("fingerprint = ")[1].split()[0]
    bad = config.replace(fingerprint, "sha256:" + "0" * 64)
    agent = start_agent("n1", bad)
    wait_for(lambda: "REFUSING the master" in agent.output(), what="agent refuses loudly")
    assert "CRITICAL" in agent.output()
    assert master.key_state("n1") == []  # it never even enrolled


def test_agent_refuses_when_the_master_key_changes_later(tmp, processes, start_agent):
    first = Master(tmp, name="master-a").start()
    processes.append(first)
    config = first.token_config(token=False)
    config = "".join(l for l in config.splitlines(True) if not l.startswith("fingerprint"))  # trust on first use
    agent = start_agent("n1", config)
    wait_for(lambda: first.key_state("n1") == ["pending"], what="n1 pending")
    first.stop()
    # A different master (new key) appears at the same address: the agent must not talk to it.
    impostor = Master(tmp, port=first.port, name="master-b").start()
    processes.append(impostor)
    wait_for(lambda: "the master's key changed" in agent.output(), timeout=30, what="agent notices the key change")
    time.sleep(1)
    assert impostor.key_state("n1") == []


def test_master_restart_agents_come_back(master, start_agent):
    config = master.token_config(uses=3)
    for node in ("n1", "n2", "n3"):
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2", "n3"}, what="all up")
    master.kill()
    master.start()
    started = time.monotonic()
    wait_for(lambda: master.up_nodes(timeout=1) == {"n1", "n2", "n3"}, timeout=30, what="all back")
    print(f"agents answered ping {time.monotonic() - started:.2f} s after the master came back")
    # The token's use count survived the restart: a fourth node with it still enrolls...
    start_agent("n4", config)
    wait_for(lambda: master.key_state("n4") == ["pending"], what="n4 pending: token has no use left")


def test_state_survives_restart_and_secrets_are_owner_only(master, start_agent):
    start_agent("n1", master.token_config())
    wait_for(lambda: master.key_state("n1") == ["accepted"], what="n1 accepted")
    fp_before = master.cli("keys", "fingerprint").stdout.strip()
    master.stop()
    master.start()
    assert master.cli("keys", "fingerprint").stdout.strip() == fp_before
    assert master.key_state("n1") == ["accepted"]
    state = master.state_dir
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "master.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "control.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "pimaster.db").st_mode) == 0o600
    agent_key = master.tmp / "agent-n1" / "agent.key"
    assert stat.S_IMODE(os.stat(agent_key).st_mode) == 0o600


def test_ping_shows_down_nodes_and_fails(master, start_agent):
    config = master.token_config(uses=2)
    a1 = start_agent("n1", config)
    start_agent("n2", config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="both up")
    a1.kill()
    rc, data = master.ping(timeout=1)
    assert rc != 0
    rows = {n["id"]: n for n in data["nodes"]}
    assert rows["n1"]["ok"] is False and rows["n2"]["ok"] is True
    assert rows["n1"]["error"]
    table = master.cli("ping", "--timeout", "1", check=False)
    assert table.returncode != 0 and "down" in table.stdout and "1 up, 1 down" in table.stdout
    # A glob picks nodes by id.
    rc, data = master.ping("n2")
    assert rc == 0 and [n["id"] for n in data["nodes"]] == ["n2"]


def test_reflashed_pi_is_denied_until_replaced(tmp, master, start_agent):
    config = master.token_config(uses=5)
    old = start_agent("n1", config)
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    # The same id with a new key (a re-flashed card): denied, even with a valid token.
    new = start_agent("n1", config, state_name="n1-reflashed")
    wait_for(lambda: sorted(master.key_state("n1")) == ["accepted", "denied"], what="second key denied")
    listing = master.cli("keys", "list").stdout
    assert old.fingerprint() in listing and new.fingerprint() in listing
    assert "--replace" in listing
    refused = master.cli("keys", "accept", "n1", check=False)
    assert refused.returncode != 0 and "--replace" in refused.stderr
    old.kill()
    # Replacing hands the id to another key: the person names which one.
    unnamed = master.cli("keys", "accept", "--replace", "n1", check=False)
    assert unnamed.returncode != 0 and "--fingerprint" in unnamed.stderr
    assert sorted(master.key_state("n1")) == ["accepted", "denied"]
    master.cli("keys", "accept", "--replace", "n1", "--fingerprint", new.fingerprint())
    assert master.key_state("n1") == ["accepted"]
    wait_for(lambda: master.up_nodes() == {"n1"}, timeout=15, what="the new key answers as n1")
    keys = master.json("keys", "list")["keys"]
    assert [k["fingerprint"] for k in keys] == [new.fingerprint()]


def test_broken_agent_config_is_a_clear_error(tmp):
    import subprocess

    from harness import agent_python, source_path

    bad = tmp / "bad.conf"
    for text, expected in (("[piagent]\nfingerprint = sha256:00\n", "'master'"),
                           ("no section here\n", "section"),
                           ("[piagent]\nmaster = h:99999\n", "bad port"),
                           ("[piagent]\nmaster = h\nfingerprint = md5:x\n", "fingerprint")):
        bad.write_text(text)
        result = subprocess.run([agent_python(), "-m", "piagent", "run", "--config", str(bad), "--state-dir",
                                 str(tmp / "s")], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=source_path(tmp)), timeout=30)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_client_commands_without_a_master_say_so(tmp):
    import subprocess
    import sys

    from harness import source_path

    result = subprocess.run([sys.executable, "-m", "pimaster", "ping", "--state-dir", str(tmp / "none")],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=source_path(tmp)))
    assert result.returncode != 0 and "no master running" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("with_python_systemd", [True, False], ids=["python3-systemd", "no-python3-systemd"])
def test_daemons_tell_systemd_they_are_ready(tmp, processes, with_python_systemd):
    """Type=notify units: READY=1 reaches $NOTIFY_SOCKET, through python3-systemd or without it."""
    from harness import Master, agent_python, source_path

    notify_path = tmp / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    pythonpath = source_path(tmp)
    if not with_python_systemd:  # a module that fails to import, in front of the real one
        blocker = tmp / "no-systemd" / "systemd"
        blocker.mkdir(parents=True)
        (blocker / "__init__.py").write_text("raise ImportError('python3-systemd hidden by the test')\n")
        pythonpath = f"{tmp / 'no-systemd'}:{pythonpath}"
    try:
        master = Master(tmp, python=agent_python())
        master.env.update(NOTIFY_SOCKET=str(notify_path), PYTHONPATH=pythonpath)
        master.start()
        processes.append(master)
        assert b"READY=1" in listener.recv(4096)
        agent = Agent(tmp, "n1", master.token_config())
        agent.env.update(NOTIFY_SOCKET=str(notify_path), PYTHONPATH=pythonpath, WATCHDOG_USEC="2000000")
        agent.start()
        processes.append(agent)
        seen = set()
        while not {"READY=1", "WATCHDOG=1"} <= seen:
            seen.update(listener.recv(4096).decode().split("\n"))
        wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    finally:
        listener.close()


def test_a_deleted_key_enrolls_again_as_pending(master, start_agent):
    agent = start_agent("n1", master.token_config(token=False))
    wait_for(lambda: master.key_state("n1") == ["pending"], what="n1 pending")
    master.cli("keys", "accept", "n1")
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    master.cli("keys", "delete", "n1")
    # The connected agent is told and comes back as pending at once (a person decides again).
    wait_for(lambda: master.key_state("n1") == ["pending"], timeout=10, what="n1 pending again")
    assert "deleted this agent's key" in agent.output()


def test_a_stranger_waiting_under_an_id_cannot_jam_keys_accept(tmp, master, start_agent):
    # Anyone on the LAN can make a key wait as pending under a node's id before the real node
    # enrolls with its token. That key is then denied (and explained), and accepting every other
    # waiting key still works.
    stranger = start_agent("n7", master.token_config(token=False), state_name="n7-stranger")
    wait_for(lambda: master.key_state("n7") == ["pending"], what="the stranger pending as n7")
    start_agent("n7", master.token_config(uses=1))
    start_agent("n8", master.token_config(token=False))
    wait_for(lambda: sorted(master.key_state("n7")) == ["accepted", "denied"], what="the stranger's key denied")
    wait_for(lambda: master.key_state("n8") == ["pending"], what="n8 pending")
    accepted = master.json("keys", "accept", "--all", "--yes")["accepted"]
    assert [k["id"] for k in accepted] == ["n8"]
    assert sorted(master.key_state("n7")) == ["accepted", "denied"]
    refused = master.cli("keys", "accept", "--replace", "n7", "--fingerprint", "sha256:" + "0" * 64, check=False)
    assert refused.returncode != 0 and "none with the fingerprint" in refused.stderr
    assert stranger.fingerprint() in master.cli("keys", "list").stdout
    assert "Traceback" not in master.output()


def test_listen_takes_zeromq_address_forms():
    from piagent.config import ConfigError
    from pimaster.commands.serve import listen_address

    assert listen_address("tcp://127.0.0.1:4510") == ("127.0.0.1", 4510)
    assert listen_address("tcp://*:4600") == ("0.0.0.0", 4600)
    assert listen_address("tcp://[::1]:4510") == ("::1", 4510)
    assert listen_address("TCP://10.0.0.1") == ("10.0.0.1", 4510)
    # The forms that worked before still do.
    assert listen_address("0.0.0.0:4510") == ("0.0.0.0", 4510)
    assert listen_address("[::1]:4700") == ("::1", 4700)
    assert listen_address("pimaster.local") == ("pimaster.local", 4510)
    for bad in ("ipc:///run/pimaster", "udp://1.2.3.4:4510", "tcp://", "tcp://1.2.3.4:99999"):
        with pytest.raises(ConfigError):
            listen_address(bad)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("listen, agent_host, shown", [
    ("tcp://127.0.0.1:{port}", "127.0.0.1", "127.0.0.1"),
    ("tcp://*:{port}", "127.0.0.1", "0.0.0.0"),
    ("tcp://[::1]:{port}", "[::1]", "::1"),
])
def test_serve_listens_on_a_zeromq_tcp_address(tmp, processes, start_agent, listen, agent_host, shown):
    if agent_host == "[::1]" and not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    master = Master(tmp, listen=listen).start()
    processes.append(master)
    status = master.json("status")
    assert (status["listen"], status["port"]) == (shown, master.port)
    config = master.json("token", "create", "--address", f"{agent_host}:{master.port}")["config"]
    start_agent("n1", config)
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up through the tcp:// address")


def test_serve_refuses_other_zeromq_transports(tmp):
    from harness import source_path
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pimaster", "serve", "--state-dir", str(tmp / "m"),
                             "--listen", "ipc:///tmp/pimaster.ipc"], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=source_path(tmp)))
    assert result.returncode == 2
    assert "--listen: only tcp:// addresses" in result.stderr


def test_a_taken_key_port_is_named_as_such(tmp):
    # The agents' port was free and the key-announce port (the next one) taken: the message used
    # to name the agents' port.
    from harness import free_port_pair, source_path
    import subprocess
    import sys

    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    port = free_port_pair()
    taken.bind(("127.0.0.1", port + 1))
    taken.listen()
    try:
        result = subprocess.run([sys.executable, "-m", "pimaster", "serve", "--state-dir", str(tmp / "m"),
                                 "--listen", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60,
                                env=dict(os.environ, PYTHONPATH=source_path(tmp)))
    finally:
        taken.close()
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port + 1}" in result.stderr and "key-announce port" in result.stderr, \
        result.stderr


def test_an_expired_token_is_named_on_the_node_and_the_master_writes_its_own_address(tmp, master, start_agent):
    # An agent holding an expired token used to log only "waiting for a person to accept"; and a
    # master listening on 127.0.0.1 wrote this host's name into the config it printed.
    config = master.json("token", "create", "--ttl", "1s")["config"]
    assert f"master = 127.0.0.1:{master.port}" in config, config
    time.sleep(1.5)
    agent = start_agent("late1", config)
    wait_for(lambda: "refused the join token" in agent.output(), what="the agent saying why it waits")
    assert "expired" in agent.output()
    status = master.cli("status").stdout
    assert "started: " in status and " ago)" in status.split("started: ")[1].splitlines()[0], status
