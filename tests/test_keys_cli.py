"""`pimaster keys accept|reject|delete` between real master and agent processes (loopback).

- Acting on more than one key shows them and asks a person on a terminal (y/N), or needs --yes
  when stdin is not a terminal; then it acts only on the keys that were shown.
- A key a person accepts brings the catalogue its agent sent while it waited: the node's files are
  checked against its own state functions, never another node's.
"""

from __future__ import annotations

import json
import os
import pty
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from harness import Process, source_path, wait_for

HOSTILE = Path(__file__).resolve().with_name("hostile_agent.py")


def keys_cli(master, *args: str) -> subprocess.CompletedProcess:
    """`pimaster keys ARGS` with stdin not a terminal (as in a script or CI)."""
    return subprocess.run([master.python, "-m", "pimaster", "keys", *args, "--state-dir", str(master.state_dir)],
                          capture_output=True, text=True, env=master.env, stdin=subprocess.DEVNULL, timeout=60)


def keys_on_terminal(master, *args: str, answer: str, before_answer=None) -> tuple[int, str, str]:
    """`pimaster keys ARGS` with stdin and stderr on a terminal: waits for the question, runs
    ``before_answer``, types ``answer``. Exit status, stdout, and what the terminal showed."""
    primary, secondary = pty.openpty()
    proc = subprocess.Popen([master.python, "-m", "pimaster", "keys", *args, "--state-dir", str(master.state_dir)],
                            stdin=secondary, stderr=secondary, stdout=subprocess.PIPE, text=True, env=master.env)
    os.close(secondary)
    shown = b""

    def read(timeout: float) -> None:
        nonlocal shown
        while select.select([primary], [], [], timeout)[0]:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the other side closed
                return
            if not chunk:
                return
            shown += chunk
            timeout = 0.2

    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in shown and time.monotonic() < deadline and proc.poll() is None:
            read(0.5)
        assert b"[y/N]" in shown, f"no question on the terminal: {shown!r}"
        if before_answer is not None:
            before_answer()
        os.write(primary, answer.encode() + b"\n")
        stdout, _ = proc.communicate(timeout=60)
        read(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(primary)
    return proc.returncode, stdout, shown.decode(errors="replace")


def pending(master, start_agent, *node_ids: str) -> dict[str, str]:
    """Real agents without a token, waiting as pending: node id -> fingerprint."""
    config = master.token_config(token=False)
    agents = {n: start_agent(n, config) for n in node_ids}
    for node_id in node_ids:
        wait_for(lambda n=node_id: master.key_state(n) == ["pending"], what=f"{node_id} pending")
    return {n: a.fingerprint() for n, a in agents.items()}


def states(master) -> dict[str, str]:
    return {k["id"]: k["state"] for k in master.json("keys", "list")["keys"]}


def test_more_than_one_key_needs_yes_when_not_on_a_terminal(master, start_agent):
    fps = pending(master, start_agent, "n1", "n2")
    for args in (["accept", "--all"], ["accept", "n*"], ["reject", "--all"], ["delete", "--all", "n*"]):
        refused = keys_cli(master, *args)
        assert refused.returncode == 2, (args, refused)
        assert refused.stdout == ""
        # The keys it would take, and what to do.
        assert fps["n1"] in refused.stderr and fps["n2"] in refused.stderr and "--yes" in refused.stderr, refused.stderr
        assert states(master) == {"n1": "pending", "n2": "pending"}
    # With --json: a JSON error object on stdout, the message on stderr too.
    refused = keys_cli(master, "accept", "--all", "--json")
    assert refused.returncode == 2
    error = json.loads(refused.stdout)
    assert "--yes" in error["error"] and "--yes" in refused.stderr
    assert [(k["id"], k["fingerprint"], k["state"]) for k in error["keys"]] == [
        ("n1", fps["n1"], "pending"), ("n2", fps["n2"], "pending")]
    assert states(master) == {"n1": "pending", "n2": "pending"}
    # One key: no question, as before.
    one = keys_cli(master, "accept", "--all", "n1")
    assert one.returncode == 0 and one.stdout == f"accepted n1 {fps['n1']}\n", one
    # --yes (or -y) says it; the output is what it was.
    accepted = keys_cli(master, "accept", "--all", "--yes", "--json")
    assert accepted.returncode == 0 and json.loads(accepted.stdout) == {"accepted": [{"id": "n2", "fingerprint": fps["n2"]}]}
    deleted = keys_cli(master, "delete", "-y", "--all")
    assert deleted.returncode == 0 and sorted(deleted.stdout.splitlines()) == [
        f"deleted n1 {fps['n1']}", f"deleted n2 {fps['n2']}"]


def test_on_a_terminal_it_asks_and_takes_only_the_keys_it_showed(master, start_agent):
    fps = pending(master, start_agent, "n1", "n2")
    status, stdout, shown = keys_on_terminal(master, "accept", "--all", answer="n")
    assert status == 1 and stdout == "" and "no key accepted" in shown
    assert fps["n1"] in shown and fps["n2"] in shown and "Accept these 2 keys?" in shown
    assert states(master) == {"n1": "pending", "n2": "pending"}

    # A key that arrives between the question and the answer is not accepted unseen.
    late: dict = {}
    status, stdout, shown = keys_on_terminal(master, "accept", "--all", answer="y",
                                             before_answer=lambda: late.update(pending(master, start_agent, "n3")))
    assert status == 0, shown
    assert sorted(stdout.splitlines()) == [f"accepted n1 {fps['n1']}", f"accepted n2 {fps['n2']}"]
    assert late["n3"] not in shown
    assert states(master) == {"n1": "accepted", "n2": "accepted", "n3": "pending"}


# ---------------------------------------------------------------------------------------------
# A key accepted by hand brings its own catalogue

def pi_facts(node_id: str, number: int) -> dict:
    """Facts that make a node fit for state files (facts.REQUIRED_FACTS)."""
    mac, ip = f"dc:a6:32:00:00:{number:02x}", f"10.0.0.{number}"
    return {"hostname": node_id, "interfaces": [{"name": "eth0", "mac": mac, "addresses": [f"{ip}/24"]}],
            "macs": [mac], "ips": [ip], "cpu_count": 4, "memory_mb": 3794}


def start_hostile(tmp: Path, master, processes: list, node_id: str, facts: dict, catalog) -> Process:
    """tests/hostile_agent.py as a node that sends ``catalog`` and waits as pending (no token);
    it answers every apply with each state ok."""
    where = tmp / f"hostile-{node_id}"
    where.mkdir()
    (where / "facts.json").write_text(json.dumps(facts))
    (where / "catalog.json").write_text(json.dumps(catalog))
    argv = [sys.executable, str(HOSTILE), "agent", "--master", master.address, "--id", node_id,
            "--facts", str(where / "facts.json"), "--catalog", str(where / "catalog.json"),
            "--key", str(where / "agent.key"), "--record", str(where / "received.jsonl")]
    proc = Process(argv, tmp / f"hostile-{node_id}.log", dict(os.environ, PYTHONPATH=source_path(tmp),
                                                               PYTHONUNBUFFERED="1")).start()
    processes.append(proc)
    return proc


def stored_catalogs(master) -> dict[str, dict]:
    db = sqlite3.connect(f"file:{master.state_dir / 'pimaster.db'}?mode=ro", uri=True, timeout=10)
    try:
        return {n: json.loads(c) for n, c in db.execute("SELECT node_id, catalog FROM nodes")}
    finally:
        db.close()


def test_a_key_accepted_by_hand_brings_its_own_catalogue(tmp, master, start_agent, processes):
    from piagent.states import catalog

    # Every node accepted by hand, none by token.
    pending(master, start_agent, "n1")
    keys_cli(master, "accept", "n1")
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    assert stored_catalogs(master)["n1"]["file.managed"] == catalog()["file.managed"]

    # narrow01's agent offers no file.managed; bare01's sent a catalogue the master refuses, so
    # it has none: the state functions of the agent beside the master are its, not narrow01's.
    narrow = {fun: spec for fun, spec in catalog().items() if fun != "file.managed"}
    start_hostile(tmp, master, processes, "narrow01", pi_facts("narrow01", 11), narrow)
    start_hostile(tmp, master, processes, "bare01", pi_facts("bare01", 12), {"not a function": {}})
    for node_id in ("narrow01", "bare01"):
        wait_for(lambda n=node_id: master.key_state(n) == ["pending"], what=f"{node_id} pending")
    for node_id in ("narrow01", "bare01"):
        assert keys_cli(master, "accept", node_id).returncode == 0
    wait_for(lambda: master.up_nodes() == {"n1", "narrow01", "bare01"}, what="all three up")
    assert stored_catalogs(master) == {"n1": catalog(), "narrow01": narrow, "bare01": {}}

    site = tmp / "site"
    site.mkdir()
    (site / "hello.yaml").write_text(f"{tmp}/hello-{{{{ node.id }}}}:\n  file.managed:\n    - contents: hi\n")
    result = master.cli("apply", str(site / "hello.yaml"), "--json", "--timeout", "30s", check=False)
    report = json.loads(result.stdout)
    assert report["nodes"]["n1"]["ok"] and (tmp / "hello-n1").read_text().strip() == "hi"
    assert report["nodes"]["bare01"]["ok"], report["nodes"]["bare01"]
    assert not report["nodes"]["narrow01"]["ok"]
    assert "file.managed" in json.dumps(report["nodes"]["narrow01"]), report["nodes"]["narrow01"]
