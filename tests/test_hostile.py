"""A compromised Pi must not own the cluster: one test per attack, asserting what a user would see.

Threat model: root on one Pi (its agent's key is accepted, it sends anything the protocol allows,
with any facts) and anyone on the LAN (no accepted key). The attacker is tests/hostile_agent.py, a
real process with its own CURVE key that records every message the master sends it, next to real
`piagent` processes as the honest nodes. Each test collects every way the attack got through and
fails with all of them listed; `pytest -s` prints the figures, and the last test a summary line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from harness import REPO, Process, source_path, wait_for

HOSTILE = Path(__file__).resolve().with_name("hostile_agent.py")
ATTACKS: dict[str, str] = {}          # test name -> "held" / "SUCCEEDED"
FIGURES: dict[str, object] = {}
MASTER_LOGS: list[Path] = []
LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
RFC1123 = re.compile(rf"{LABEL}(\.{LABEL})*")   # use with fullmatch, and at most 253 characters


# ---------------------------------------------------------------------------------------------
# Helpers

class Findings:
    """Every way an attack got through, so that one run names them all."""

    def __init__(self, attack: str) -> None:
        self.attack = attack
        self.items: list[str] = []

    def check(self, ok, message: str) -> bool:
        if not ok:
            self.items.append(message)
        return bool(ok)

    def verdict(self, master=None) -> None:
        if master is not None:
            log = master.output()
            self.check("Traceback" not in log, "the master logged a traceback:\n" + _traceback_excerpt(log))
            self.check(master.alive(), "the master died")
        if self.items:
            pytest.fail(f"{self.attack}: the attack got through ({len(self.items)}):\n  - " + "\n  - ".join(self.items),
                        pytrace=False)


def _traceback_excerpt(log: str) -> str:
    at = log.find("Traceback")
    return log[max(0, log.rfind("\n", 0, at - 200)):at + 1500] if at >= 0 else ""


def mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def strict_json(text: str):
    """JSON as other programs read it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def token_of(config: str) -> str:
    return config.split("token = ")[1].split()[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def strings_in(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings_in(k) + strings_in(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings_in(v)]
    return []


def agent_bytes(agent) -> bytes:
    """Everything a real agent kept: its log and its state dir (kept results, job markers)."""
    data = agent.log_path.read_bytes() if agent.log_path.exists() else b""
    for root, _, files in os.walk(agent.state_dir):
        for name in files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as fh:
                    data += fh.read()
    return data


def pi_facts(hostname: str, mac: str, ip: str, serial: str = "10000000deadbeef") -> dict:
    """What a Raspberry Pi 4 reports (agent/facts.py), with the given identity."""
    return {"hostname": hostname, "fqdn": hostname, "machine_id": "5f1e" * 8,
            "pi_model": "Raspberry Pi 4 Model B Rev 1.4", "pi_serial": serial,
            "interfaces": [{"name": "eth0", "mac": mac, "addresses": [f"{ip}/24"]}],
            "macs": [mac], "ips": [ip], "cpu_count": 4, "memory_mb": 3794,
            "os": {"ID": "debian", "VERSION_ID": "12", "VERSION_CODENAME": "bookworm",
                   "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
            "arch": "arm64", "machine": "aarch64", "kernel": "6.6.31+rpt-rpi-v8", "boot_dir": "/boot/firmware",
            "systemd": True, "virtualization": "none", "agent_version": "0.1.0"}


class Hostile(Process):
    """One tests/hostile_agent.py process (agent mode); see that file for what it does."""

    def __init__(self, tmp: Path, master, node_id: str = "hostile01", *, name: str | None = None,
                 facts: dict | None = None, token: str | None = None, id_json: str | None = None,
                 key: Path | None = None, results: dict | None = None, send: list | None = None,
                 no_enroll: bool = False) -> None:
        self.node_id = node_id
        self.name = name or node_id
        self.dir = tmp / f"hostile-{self.name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record = self.dir / "received.jsonl"
        self.commands = self.dir / "commands.jsonl"
        self.key = key or self.dir / "agent.key"
        argv = [sys.executable, str(HOSTILE), "agent", "--master", master.address, "--record", str(self.record),
                "--commands", str(self.commands), "--key", str(self.key)]
        argv += ["--id-json", id_json] if id_json is not None else ["--id", node_id]
        for flag, value in (("--facts", facts), ("--results", results), ("--send", send)):
            if value is not None:
                path = self.dir / f"{flag[2:]}.json"
                path.write_text(json.dumps(value))
                argv += [flag, str(path)]
        if token:
            argv.append(f"--token={token}")  # one word: a token may begin with a dash
        if no_enroll:
            argv.append("--no-enroll")
        env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
        super().__init__(argv, tmp / f"hostile-{self.name}.log", env)

    def received(self) -> list[dict]:
        try:
            lines = self.record.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def received_text(self) -> str:
        try:
            return self.record.read_text()
        except FileNotFoundError:
            return ""

    def applies(self) -> list[dict]:
        return [m["body"] for m in self.received() if m["type"] == "apply"]

    def status(self) -> str | None:
        answers = [m["body"].get("status") for m in self.received() if m["type"] == "enrolled"]
        return answers[-1] if answers else None

    def wait_answer(self, timeout: float = 10) -> str | None:
        """The master's answer to the enrollment (accepted, pending, ...), or None if it gave none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status() is not None:
                return self.status()
            assert self.alive(), f"{self.name} exited:\n{self.output()}"
            time.sleep(0.1)
        return None

    def fingerprint(self) -> str | None:
        found = re.search(r"key (sha256:[0-9a-f]{64})", self.output())
        return found.group(1) if found else None

    def command(self, *items: dict) -> None:
        with open(self.commands, "a") as fh:
            for item in items:
                fh.write(json.dumps(item) + "\n")


@pytest.fixture
def hostile(tmp, master, processes):
    def start(node_id: str = "hostile01", **kwargs) -> Hostile:
        proc = Hostile(tmp, master, node_id, **kwargs).start()
        processes.append(proc)
        return proc
    return start


def flood(master, tmp: Path, *args: str, timeout: float = 120) -> dict:
    """Run hostile_agent.py flood to completion; its summary."""
    env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(HOSTILE), "flood", "--master", master.address, *args],
                            capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"the flood tool failed:\n{result.stdout}\n{result.stderr}"
    print(result.stdout.strip())
    return json.loads(result.stdout.strip().splitlines()[-1])["flood"]


def apply_json(master, *args: str, wait: str = "30s") -> tuple[subprocess.CompletedProcess, dict | None]:
    """`pimaster apply ... --json --timeout WAIT`: the process and its report (None if it printed none).
    A hostile node may never answer (as a dead one would not): WAIT bounds how long that costs."""
    result = master.cli("apply", *args, "--json", "--timeout", wait, check=False, timeout=120)
    try:
        report = strict_json(result.stdout)
    except ValueError:
        return result, None
    return result, None if "error" in report else report  # a refused apply prints a JSON error object


def outcome(result, report) -> str:
    """One line for the -s output: exit status and each node's status."""
    if report is None:
        return f"exit {result.returncode}: {result.stderr.strip()[:300]}"
    nodes = ", ".join(f"{n} {v['status']}{'' if v['ok'] else ' (not ok)'}" for n, v in sorted(report["nodes"].items()))
    return f"exit {result.returncode}: {nodes}"


def honest_up(master, node_id: str = "good01", timeout: float = 30) -> None:
    wait_for(lambda: node_id in master.up_nodes(), timeout, what=f"{node_id} up")


@pytest.fixture(autouse=True)
def _record_outcome(request):
    if "master" in request.fixturenames:
        MASTER_LOGS.append(request.getfixturevalue("master").log_path)
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and not request.node.name.startswith("test_zz"):
        ATTACKS[request.node.name] = "held" if report.passed else "SUCCEEDED"


# ---------------------------------------------------------------------------------------------
# 1. Facts become YAML

def test_facts_cannot_become_yaml_in_anyones_job(tmp, master, start_agent, hostile):
    f = Findings("facts become YAML")
    config = master.token_config(uses=5)
    good = start_agent("good01", config)
    key_file = master.state_dir / "master.key"
    master_secret = key_file.read_bytes().strip().decode()
    # hostname: breaks out of a block scalar into two top-level states for every node rendering it
    # (a command, and the master's own secret key read through `source:`); `#` swallows what follows.
    evil_hostname = (f"h\nevil-cmd:\n  cmd.run:\n    - name: touch {tmp}/pwned-hostname\n"
                     f"evil-file:\n  file.managed:\n    - name: {tmp}/stolen-hostname\n"
                     f"    - source: {key_file}\n    - mode: \"0644\"  #")
    # interface name: network.yaml writes it as `- name: {{ iface }}`; the rest of that state's lines
    # become arguments of the injected network.static, so the file stays valid.
    evil_iface = (f"eth0\n    - address: 10.77.0.150/24\nevil-net:\n  file.managed:\n"
                  f"    - name: {tmp}/stolen-iface\n    - source: {key_file}\nevil-tail:\n  network.static:\n"
                  f"    - name: eth1")
    facts = pi_facts("hostile01", "dc:a6:32:66:66:01", "10.77.0.150")
    facts["hostname"] = evil_hostname
    facts["interfaces"] = [{"name": evil_iface, "mac": "dc:a6:32:66:66:01", "addresses": ["10.77.0.150/24"]}]
    bad = hostile("hostile01", facts=facts, token=token_of(config))
    honest_up(master)
    answer = bad.wait_answer(5)
    print(f"hostile01's enrollment: {answer}")

    # What is stored and shown.
    nodes = master.json("nodes")["nodes"]
    keys = master.json("keys", "list")["keys"]
    for node in nodes:
        hostname = node["facts"].get("hostname")
        f.check(hostname is None or len(str(hostname)) <= 253 and RFC1123.fullmatch(str(hostname)),
                f"`pimaster nodes --json` shows {node['id']}'s hostname fact {hostname!r} (not an RFC 1123 name)")
        for iface in node["facts"].get("interfaces") or []:
            name = iface.get("name") if isinstance(iface, dict) else iface
            f.check(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", name),
                    f"`pimaster nodes --json` shows {node['id']}'s interface name {name!r}")
        f.check(not any("\n" in s for s in strings_in(node["facts"])),
                f"`pimaster nodes --json` shows a fact of {node['id']} with a newline in it")
    f.check(not any("\n" in str(k.get("hostname")) for k in keys),
            "`pimaster keys list` shows a hostname with a newline")
    f.check(re.search(r"hostile01.*fact|fact.*hostile01", master.output(), re.I),
            "the master's log does not say that hostile01's facts were refused")

    # A small state file a person writes: /etc/hosts-like lines for every node, by hostname.
    hosts = write(tmp / "site1" / "hosts.yaml", f"""
        {tmp}/hosts-{{{{ node.id }}}}:
          file.managed:
            - contents: |
        {{% for n in nodes %}}
                {{{{ n.hostname }}}} {{{{ n.id }}}}
        {{% endfor %}}
        """)
    result, report = apply_json(master, str(hosts))
    print("hosts.yaml:", outcome(result, report))
    if f.check(report is not None and "good01" in report.get("nodes", {}),
               f"the honest node good01 got no job from hosts.yaml (exit {result.returncode}): "
               f"{result.stderr.strip()[:300]}"):
        states = report["nodes"]["good01"]["states"]
        f.check([s["id"] for s in states] == [f"{tmp}/hosts-good01"],
                f"good01's job from hosts.yaml has extra states: {[(s['fun'], s['id']) for s in states]}")
        f.check(report["nodes"]["good01"]["ok"], f"good01's job failed: {states}")
    for leftover in ("pwned-hostname", "stolen-hostname", "stolen-iface"):
        f.check(not (tmp / leftover).exists(), f"an honest node ran an injected state: {tmp / leftover} exists")
    written = (tmp / "hosts-good01").read_text() if (tmp / "hosts-good01").exists() else ""
    f.check("evil" not in written and master_secret not in written, f"good01's file holds injected text: {written!r}")

    # The shipped network.yaml with the shipped inventory next to it, in test mode.
    site = tmp / "site2"
    site.mkdir()
    for name in ("network.yaml", "hosts.yaml", "cluster.yaml"):  # network.yaml includes hosts.yaml
        shutil.copy(REPO / "states" / name, site / name)
    result, report = apply_json(master, str(site / "network.yaml"), "--test")
    print("network.yaml --test:", outcome(result, report))
    if f.check(report is not None and "good01" in report.get("nodes", {}),
               f"the honest node good01 got no job from network.yaml (exit {result.returncode}): "
               f"{result.stderr.strip()[:300]}"):
        states = report["nodes"]["good01"]["states"]
        extra = [(s["fun"], s["id"]) for s in states
                 if (s["id"], s["fun"]) not in (("hostname", "host.hostname"), ("address", "network.static"),
                                                ("cluster-hosts", "file.blockreplace"))]
        f.check(not extra, f"good01's job from network.yaml has extra states: {extra}")
    for job in bad.applies():
        states = job.get("states") or []
        funs = [(s.get("fun"), s.get("id")) for s in states]
        f.check(not any(s.get("fun") == "cmd.run" for s in states), f"hostile01's own job holds cmd.run: {funs}")
        f.check(sum(s.get("fun") == "file.managed" for s in states) <= 1 and
                sum(s.get("fun") == "network.static" for s in states) <= 1,
                f"hostile01's own job holds injected states: {funs}")
    f.check(master_secret not in bad.received_text(), "the master's secret key (master.key) was sent to hostile01")
    f.check(master_secret.encode() not in agent_bytes(good), "the master's secret key reached good01 (log or state dir)")
    print(f"hostile01 received {len(bad.applies())} job(s): "
          f"{[[s.get('id') for s in j.get('states') or []] for j in bad.applies()]}")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 2. source: / include: outside the state tree

def test_source_and_include_cannot_leave_the_state_tree(tmp, master, start_agent, hostile):
    f = Findings("source/include outside the state tree")
    config = master.token_config(uses=5)
    good = start_agent("good01", config)
    bad = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:01", "10.0.0.66"), token=token_of(config))
    key_file = master.state_dir / "master.key"
    master_secret = key_file.read_bytes().strip().decode()
    write(tmp / "outside.txt", "OUTSIDE-THE-TREE\n")
    write(tmp / "outside-states.yaml", f"""
        {tmp}/outside-{{{{ node.id }}}}:
          file.managed:
            - contents: OUTSIDE-INCLUDED
        """)
    site = tmp / "site"
    write(site / "files" / "inside.txt", "inside the tree\n")
    write(site / "ok.yaml", f"""
        {tmp}/inside-{{{{ node.id }}}}:
          file.managed:
            - source: files/inside.txt
        """)
    cases = {
        "abs-source.yaml": f"""
            {tmp}/leak-abs-{{{{ node.id }}}}:
              file.managed:
                - source: {key_file}
            """,
        "dotdot-source.yaml": f"""
            {tmp}/leak-dotdot-{{{{ node.id }}}}:
              file.managed:
                - source: ../outside.txt
            """,
        "salt-source.yaml": f"""
            {tmp}/leak-salt-{{{{ node.id }}}}:
              file.managed:
                - source: salt://../../{os.path.relpath(key_file, tmp.parent)}
            """,
        "dotdot-include.yaml": """
            include:
              - ../outside-states
            """,
        "abs-include.yaml": f"""
            include:
              - {tmp}/outside-states
            """,
    }
    honest_up(master)
    assert bad.wait_answer(10) == "accepted", bad.output()
    result, report = apply_json(master, str(site / "ok.yaml"))
    f.check(result.returncode == 0 and (tmp / "inside-good01").exists(),
            f"a source: inside the state tree no longer works (exit {result.returncode}): {result.stderr[:300]}")
    jobs_before = len(master.json("jobs")["jobs"])
    applies_before = len(bad.applies())
    for name, text in cases.items():
        path = write(site / name, text)
        result, report = apply_json(master, str(path))
        print(f"{name}: exit {result.returncode}: {result.stderr.strip()[:300]}")
        if f.check(result.returncode != 0 and "refused" in result.stderr,
                   f"`pimaster apply {name}` was not refused (exit {result.returncode})"):
            f.check(re.search(re.escape(name) + r":\d+", result.stderr),
                    f"`pimaster apply {name}`: the refusal does not name {name}:LINE: {result.stderr.strip()[:200]!r}")
    f.check(len(master.json("jobs")["jobs"]) == jobs_before, "a job was created for a refused file")
    time.sleep(0.5)
    f.check(len(bad.applies()) == applies_before, f"hostile01 received {len(bad.applies()) - applies_before} job(s) "
                                                  "from state files reaching outside their tree")
    leaked = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("leak-", "outside-")) and p.is_file()
                    and p.name != "outside-states.yaml")
    f.check(not leaked, f"files were written from outside the state tree: {leaked}")
    f.check(master_secret not in bad.received_text(), "the master's secret key (master.key) was sent to hostile01")
    f.check("OUTSIDE-THE-TREE" not in bad.received_text() and "OUTSIDE-INCLUDED" not in bad.received_text(),
            "hostile01 received content from outside the state tree")
    f.check(master_secret.encode() not in agent_bytes(good), "the master's secret key reached good01 (log or state dir)")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 3. MAC / serial claims

CTL_MAC, NFS_SERIAL = "dc:a6:32:01:02:03", "10000000c0ffee01"


def test_a_claimed_mac_or_serial_gets_no_roles_and_no_secrets(tmp, master, hostile):
    f = Findings("MAC/serial claim")
    token = token_of(master.token_config(uses=10))
    site = tmp / "site3"
    write(site / "cluster.yaml", f"""
        cluster:
          name: t
        nodes:
          - mac: "{CTL_MAC}"
            hostname: ctl
            roles: [controller]
          - serial: "{NFS_SERIAL}"
            hostname: storage
            roles: [nfs-server]
        """)
    state = write(site / "munge.yaml", f"""
        {{% if 'controller' in node.roles %}}
        {tmp}/munge-{{{{ node.id }}}}:
          file.managed:
            - contents: "{{{{ secret('munge') }}}}"
        {{% endif %}}
        {{% if 'nfs-server' in node.roles %}}
        {tmp}/nfs-{{{{ node.id }}}}:
          file.managed:
            - contents: "{{{{ secret('nfs-key') }}}}"
        {{% endif %}}
        {tmp}/roles-{{{{ node.id }}}}:
          file.managed:
            - contents: "{{{{ node.roles | join(',') }}}} {{{{ node.hostname }}}}"
        """)
    ctl = hostile("ctl01", facts=pi_facts("ctl01", CTL_MAC, "10.0.0.1", serial="10000000aaaa0001"), token=token)
    nfs = hostile("nfs01", facts=pi_facts("nfs01", "dc:a6:32:01:02:04", "10.0.0.2", serial=NFS_SERIAL), token=token)
    key = tmp / "hostile01.key"
    innocent = pi_facts("hostile01", "dc:a6:32:66:66:01", "10.0.0.66", serial="10000000bad00001")
    first = hostile("hostile01", name="hostile01-first", facts=innocent, token=token, key=key)
    for node in (ctl, nfs, first):
        assert node.wait_answer(10) == "accepted", node.output()
    # Accepted with its own identity; now it reconnects (same key) claiming the controller's MAC
    # and the NFS server's serial.
    first.stop()
    claim = dict(innocent, macs=[CTL_MAC, "dc:a6:32:66:66:01"], pi_serial=NFS_SERIAL,
                 interfaces=[{"name": "eth0", "mac": CTL_MAC, "addresses": ["10.0.0.66/24"]}])
    bad = hostile("hostile01", name="hostile01-claim", facts=claim, key=key)
    print("hostile01 reconnected with the claim:", bad.wait_answer(10))
    time.sleep(0.5)
    result, report = apply_json(master, str(state))
    print("apply:", outcome(result, report))
    f.check(report is not None, f"the apply was refused after a node claimed another's MAC on reconnecting "
                                f"(exit {result.returncode}): {result.stderr.strip()[:300]}")
    munge = (master.state_dir / "secrets" / "munge").read_text().strip() \
        if (master.state_dir / "secrets" / "munge").exists() else None
    nfs_key = (master.state_dir / "secrets" / "nfs-key").read_text().strip() \
        if (master.state_dir / "secrets" / "nfs-key").exists() else None
    f.check(munge and munge in ctl.received_text(), "control: the real controller did not get the munge key")
    f.check(nfs_key and nfs_key in nfs.received_text(), "control: the real NFS server did not get its key")
    for secret, what in ((munge, "munge"), (nfs_key, "nfs-key")):
        f.check(not secret or secret not in bad.received_text(),
                f"hostile01 got secret('{what}') by claiming a MAC/serial after its key was accepted")
    for job in bad.applies():
        roles = [s["args"].get("contents") for s in job.get("states", []) if "/roles-" in s.get("id", "")]
        f.check(not any("controller" in str(r) or "nfs-server" in str(r) for r in roles),
                f"hostile01 was rendered with another node's roles: {roles}")

    # A fresh key that claims the controller's MAC in its first enrollment: two accepted nodes now
    # match one inventory entry, and the apply must say so rather than pick one.
    second = hostile("hostile02", facts=pi_facts("hostile02", CTL_MAC, "10.0.0.67", serial="10000000bad00002"),
                     token=token)
    print("hostile02 enrolled claiming the controller's MAC:", second.wait_answer(10))
    result, report = apply_json(master, str(state))
    print("apply:", outcome(result, report))
    if second.status() == "accepted":
        f.check(result.returncode != 0 and "ctl01" in result.stderr and "hostile02" in result.stderr,
                f"two accepted nodes match one inventory entry (mac {CTL_MAC}), but the apply was not refused "
                f"naming both (exit {result.returncode}): {result.stderr.strip()[:300]}")
    time.sleep(0.5)
    f.check(not munge or munge not in second.received_text(), "hostile02 got secret('munge') by claiming its MAC")
    for job in second.applies():
        roles = [s["args"].get("contents") for s in job.get("states", []) if "/roles-" in s.get("id", "")]
        f.check(not any("controller" in str(r) for r in roles), f"hostile02 was rendered as the controller: {roles}")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 4. Only its own secrets

def test_a_later_stage_gets_only_its_own_redactions(tmp, master, hostile):
    f = Findings("other nodes' secrets in redact")
    token = token_of(master.token_config(uses=5))
    join_line = ("kubeadm join 10.0.0.1:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:"
                 + "ab" * 32)
    cp = hostile("cp01", facts=pi_facts("cp01", "dc:a6:32:00:00:01", "10.0.0.1"), token=token, results={
        "states": {"make-token": {"status": "changed", "changes": {"stdout": join_line + "\n"}}}})
    worker = hostile("good02", facts=pi_facts("good02", "dc:a6:32:00:00:02", "10.0.0.2"), token=token)
    bad = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:01", "10.0.0.66"), token=token)
    for node in (cp, worker, bad):
        assert node.wait_answer(10) == "accepted", node.output()
    site = tmp / "site4"
    write(site / "cluster.yaml", """
        nodes:
          - id: cp01
            roles: [control-plane]
        """)
    state = write(site / "join.yaml", f"""
        pimaster:
          stages: [control-plane]
        {{% if 'control-plane' in node.roles %}}
        make-token:
          cmd.run:
            - name: kubeadm token create --print-join-command
            - sensitive: true
        {{% elif node.id == 'good02' %}}
        join:
          cmd.run:
            - name: "{{{{ results.cp01['make-token'].changes.stdout | trim }}}} {{{{ secret('worker-only') }}}}"
        {{% else %}}
        {tmp}/hello-{{{{ node.id }}}}:
          file.managed:
            - contents: "hello {{{{ node.id }}}} {{{{ secret('own-' ~ node.id, 32) }}}}"
        {{% endif %}}
        """)
    result, report = apply_json(master, str(state))
    print("apply:", outcome(result, report))
    f.check(report is not None and all(n["ok"] for n in report["nodes"].values()),
            f"control: the staged apply did not succeed (exit {result.returncode}): {result.stderr.strip()[:300]}")
    f.check(join_line in worker.received_text(), "control: good02 did not get the join command it uses")
    jobs = bad.applies()
    f.check(jobs, "control: hostile01 got no job")
    for job in jobs:
        own = json.dumps(job.get("states"))
        foreign = [r for r in job.get("redact") or [] if not isinstance(r, str) or r not in own]
        f.check(not foreign, f"hostile01's redact list holds {len(foreign)} string(s) its own job does not use, "
                             f"e.g. {str(foreign[0])[:60]!r}" if foreign else "")
    f.check(join_line not in bad.received_text() and "abcdef.0123456789abcdef" not in bad.received_text(),
            "hostile01 received the join token (sensitive output of an earlier stage, meant for good02)")
    worker_only = (master.state_dir / "secrets" / "worker-only")
    f.check(not worker_only.exists() or worker_only.read_text().strip() not in bad.received_text(),
            "hostile01 received good02's secret('worker-only')")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 5. Unauthenticated memory

def test_big_frames_from_unknown_keys_cost_no_memory(tmp, master, start_agent):
    f = Findings("16 MiB frames from unknown keys")
    start_agent("good01", master.token_config())
    honest_up(master)
    pid = master.proc.pid
    before = mb(pid, "VmHWM")
    # Two keys, one frame each: an array of ~16.7 million empty maps (about 1 GB once decoded).
    flood(master, tmp, "--mode", "big", "--keys", "2", "--shape", "array")
    up = master.up_nodes(timeout=10)   # answered only once the master got through both frames
    time.sleep(0.5)
    peak = mb(pid, "VmHWM")
    FIGURES["peak_mb_big_frames"] = round(peak, 1)
    print(f"master memory: peak {before:.1f} MB before, {peak:.1f} MB after two 16 MiB frames of empty maps "
          f"(RSS now {mb(pid, 'VmRSS'):.1f} MB)")
    f.check(peak < 150, f"the master's peak memory reached {peak:.0f} MB (from {before:.0f} MB) on two 16 MiB "
                        "frames from keys it never accepted (frames over 64 KiB from such keys must be dropped "
                        "before decoding)")
    f.check(up == {"good01"}, f"the master no longer answers ping for good01 ({up})")
    keys = master.json("keys", "list")["keys"]
    f.check(len(keys) == 1, f"the big frames left keys behind: {[(k['id'], k['state']) for k in keys]}")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 6. Enrollment flood

def _db_mb(state_dir: Path) -> float:
    return sum(p.stat().st_size for p in state_dir.glob("pimaster.db*")) / 1e6


def _largest_facts(state_dir: Path) -> int:
    db = sqlite3.connect(f"file:{state_dir / 'pimaster.db'}?mode=ro", uri=True, timeout=10)
    try:
        return max(db.execute("SELECT COALESCE(MAX(LENGTH(facts)), 0) FROM keys").fetchone()[0],
                   db.execute("SELECT COALESCE(MAX(LENGTH(facts)), 0) FROM nodes").fetchone()[0])
    finally:
        db.close()


def test_an_enrollment_flood_is_bounded(tmp, master, start_agent):
    f = Findings("enrollment flood")
    start_agent("good01", master.token_config())
    honest_up(master)
    lines_before = len(master.output().splitlines())
    big = flood(master, tmp, "--mode", "enroll", "--keys", "300", "--facts-bytes", "100000", "--id-prefix", "flood",
                "--batch", "100", "--wait", "1.5")
    time.sleep(0.5)
    keys = master.json("keys", "list")["keys"]
    stored_big = sum(1 for k in keys if k["id"].startswith("flood"))
    largest = _largest_facts(master.state_dir)
    f.check(largest <= 64 * 1024, f"facts of {largest} bytes were stored (over 64 KiB must be refused)")
    print(f"300 enrollments with 100 kB facts: answers {big['answers']}, {stored_big} keys stored, "
          f"largest facts stored {largest} bytes")
    small = flood(master, tmp, "--mode", "enroll", "--keys", "300", "--facts-bytes", "1000", "--id-prefix", "floodb",
                  "--batch", "100", "--wait", "1.5")
    time.sleep(0.5)
    keys = master.json("keys", "list")["keys"]
    pending = sum(1 for k in keys if k["state"] == "pending")
    db_mb = _db_mb(master.state_dir)
    log = master.output().splitlines()[lines_before:]
    about_flood = sum(1 for line in log if "flood" in line)
    FIGURES.update(pending_after_flood=pending, db_mb_after_flood=round(db_mb, 2), log_lines_in_flood=len(log))
    print(f"300 more with 1 kB facts: answers {small['answers']}; pending keys {pending}, database {db_mb:.2f} MB, "
          f"{len(log)} log lines during the flood ({about_flood} naming a flood key)")
    f.check(pending <= 256, f"{pending} keys wait as pending after 600 enrollments without a token "
                            "(the default --max-pending is 256): `keys accept --all` would be asked to take them all")
    f.check(db_mb < 8, f"the database grew to {db_mb:.1f} MB")
    f.check(len(log) <= 120, f"the master logged {len(log)} lines for 600 strangers' enrollments "
                             f"({about_flood} naming a flood key): not rate-limited")
    f.check(master.up_nodes() == {"good01"}, "good01 no longer answers ping after the flood")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 7. Idle sessions

IDLE_SESSIONS, FD_BOUND, FD_WAIT_S = 400, 100, 60


def test_idle_sessions_from_unknown_keys_are_closed(tmp, master, start_agent, processes):
    f = Findings("idle CURVE sessions")
    pid = master.proc.pid
    baseline = open_fds(pid)
    env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
    idle = Process([sys.executable, str(HOSTILE), "flood", "--master", master.address, "--mode", "idle",
                    "--keys", str(IDLE_SESSIONS)], tmp / "flood-idle.log", env).start()
    processes.append(idle)
    wait_for(lambda: "idle sessions ready" in idle.output() or not idle.alive(), 40, what="the idle sessions")
    peak = open_fds(pid)
    started = time.monotonic()
    start_agent("good01", master.token_config())   # an honest agent arrives during the flood
    try:
        honest_up(master, timeout=40)
    except AssertionError as exc:
        f.check(False, f"an honest agent could not enroll during the idle flood: {exc}")
    counts = []
    while time.monotonic() - started < FD_WAIT_S:
        counts.append(open_fds(pid))
        peak = max(peak, counts[-1])
        if counts[-1] < FD_BOUND:
            break
        time.sleep(1)
    settled = time.monotonic() - started
    FIGURES.update(idle_fds_peak=peak, idle_fds_after=counts[-1])
    print(f"master fds: {baseline} before, {peak} with {IDLE_SESSIONS} idle sessions, {counts[-1]} after "
          f"{settled:.0f} s; flood: {idle.output().strip().splitlines()[-1] if idle.output().strip() else ''}")
    f.check(counts[-1] < FD_BOUND, f"{IDLE_SESSIONS} idle sessions from unknown keys still hold {counts[-1]} of the "
                                   f"master's descriptors after {FD_WAIT_S} s (bound {FD_BOUND})")
    f.check("good01" in master.up_nodes(), "good01 does not answer ping after the idle flood")
    idle.stop()
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 8. Malformed results and empty facts

def test_malformed_results_and_empty_facts_break_nothing_for_others(tmp, master, start_agent, hostile):
    f = Findings("malformed results / empty facts")
    config = master.token_config(uses=5)
    token = token_of(config)
    start_agent("good01", config)
    bad = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:01", "10.0.0.66"), token=token, results={
        "summary": {"failed": float("nan"), "ok": "many", "changed": -1},
        "results": ["garbage", 7, None, [1, 2], {"id": {"nested": [1]}, "status": float("nan"), "changes": "x"},
                    {"id": "x" * 5000, "fun": None, "result": "maybe", "comment": {"a": float("inf")}}],
        "body": {"started": "yesterday", "finished": float("nan")}})
    blank = hostile("blank02", facts={}, token=token)
    honest_up(master)
    for node in (bad, blank):
        assert node.wait_answer(10) == "accepted", node.output()
    simple = write(tmp / "site8" / "simple.yaml", f"""
        {tmp}/simple-{{{{ node.id }}}}:
          file.managed:
            - contents: hi
        """)
    result, report = apply_json(master, str(simple), "--target", "*01", wait="8s")
    print("simple.yaml:", outcome(result, report))
    f.check(report is not None, f"`pimaster apply --json` printed no JSON report after a NaN result "
                                f"(exit {result.returncode}): {result.stderr.strip()[:300]}")
    if report is not None:
        f.check(report["nodes"].get("good01", {}).get("ok"),
                f"good01's result is not ok: {report['nodes'].get('good01')}")
    job_id = report["job"] if report else None
    commands = [("jobs", "--json"), ("jobs",), ("nodes", "--json"), ("nodes",), ("ping", "--json", "--timeout", "5"),
                ("ping", "--timeout", "5"), ("status", "--json")]
    if job_id:
        commands += [("job", job_id, "--json"), ("job", job_id)]
    for args in commands:
        out = master.cli(*args, check=False)
        allowed = (0, 1) if args[0] == "job" else (0,)   # `job` exits 1 when a node failed: that is news, not a crash
        f.check(out.returncode in allowed and "internal error" not in out.stderr,
                f"`pimaster {' '.join(args)}` exited {out.returncode}: {out.stderr.strip()[:200]}")
        if "--json" in args:
            try:
                data = strict_json(out.stdout)
                if args[0] == "job":
                    f.check(data["nodes"]["good01"]["ok"],
                            f"`pimaster job` shows good01 failed: {data['nodes']['good01']}")
            except (ValueError, KeyError, TypeError) as exc:
                f.check(False, f"`pimaster {' '.join(args)}` printed no valid JSON ({exc}): {out.stdout[:200]!r}")

    # A node with no facts at all fails only its own rendering of a file that lists every node.
    listing = write(tmp / "site8" / "listing.yaml", f"""
        {tmp}/listing-{{{{ node.id }}}}:
          file.managed:
            - contents: |
        {{% for n in nodes %}}
                {{{{ n.id }}}} {{{{ n.hostname }}}} {{{{ n.ips | join(',') }}}} {{{{ n.cpu_count }}}}
        {{% endfor %}}
        """)
    result, report = apply_json(master, str(listing), "--target", "[gb]*", wait="8s")
    print("listing.yaml:", outcome(result, report))
    f.check((tmp / "listing-good01").exists(), f"blank02's empty facts stopped the apply for everyone "
                                               f"(exit {result.returncode}): {result.stderr.strip()[:300]}")
    if report is not None:
        f.check(report["nodes"].get("good01", {}).get("ok"), f"good01 failed: {report['nodes'].get('good01')}")
        f.check(not report["nodes"].get("blank02", {}).get("ok"), "blank02 (no facts) rendered fine?")
    f.check(not any("listing" in json.dumps(j) for j in blank.applies()),
            "blank02 (no facts) was sent a rendering of listing.yaml")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 9. Node id with a trailing newline

def test_a_node_id_with_a_newline_cannot_enroll(tmp, master, start_agent, hostile):
    f = Findings("id with a trailing newline")
    config = master.token_config(uses=5)
    start_agent("good01", config)
    honest_up(master)
    bad = hostile("good01-newline", id_json=json.dumps("good01\n"), token=token_of(config),
                  facts=pi_facts("good01", "dc:a6:32:66:66:01", "10.0.0.66"))
    answer = bad.wait_answer(4)
    print("enrollment as 'good01\\n':", answer)
    f.check(answer != "accepted", "the master accepted a key as 'good01\\n'")
    keys = master.json("keys", "list")["keys"]
    odd = [k["id"] for k in keys if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", k["id"])]
    f.check(not odd, f"`pimaster keys list` holds malformed ids: {odd}")
    ids = [n["id"] for n in master.json("nodes")["nodes"]]
    f.check(ids == ["good01"], f"`pimaster nodes` shows {ids}")
    _, pinged = master.ping(timeout=3)
    f.check([n["id"] for n in pinged.get("nodes", [])] == ["good01"], f"`pimaster ping` shows {pinged}")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 10. Progress flood

def _apply_over_control(master, file: str, target: str, events: list, done: dict) -> None:
    """`pimaster apply` as the CLI does it (the control socket, serving the state tree), keeping every event."""
    from pimaster.client import ControlClient
    from pimaster.commands.apply import state_tree_served

    path, root, serve_file = state_tree_served(file, str(master.state_dir))
    try:
        done["result"] = ControlClient(str(master.state_dir)).call(
            "apply", file=path, root=root, target=target, timeout=60, timeout_extra=120,
            on_event=events.append, on_ask=serve_file)
    except Exception as exc:  # the test reports what the apply ended with
        done["error"] = repr(exc)


PROGRESS_FLOOD = 10000


def test_a_progress_flood_for_others_jobs_is_dropped(tmp, master, start_agent, hostile):
    f = Findings("job_progress flood")
    config = master.token_config(uses=5)
    start_agent("good01", config)
    bad = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:01", "10.0.0.66"), token=token_of(config))
    honest_up(master)
    assert bad.wait_answer(10) == "accepted", bad.output()
    slow = write(tmp / "site10" / "slow.yaml", """
        slow:
          cmd.run:
            - name: sleep 8
        """)
    pid = master.proc.pid
    before = mb(pid, "VmHWM")
    events: list = []
    done: dict = {}
    runner = threading.Thread(target=_apply_over_control, args=(master, str(slow), "good01", events, done), daemon=True)
    runner.start()
    wait_for(lambda: any(e.get("type") == "start" for e in events), 20, what="the apply to start")
    job_id = next(e["job"] for e in events if e.get("type") == "start")
    comment = "x" * 8000
    bad.command({"type": "job_progress", "repeat": PROGRESS_FLOOD,
                 "body": {"job": job_id, "index": 0, "state": {"id": "slow", "fun": "cmd.run", "status": "ok",
                                                               "comment": comment}}},
                {"type": "job_progress", "repeat": 1000,
                 "body": {"job": "20200101-000000-abcdef", "index": 0, "state": {"comment": comment}}},
                {"type": "job_result", "body": {"job": job_id, "results": [], "summary": {"ok": 1}}})
    wait_for(lambda: "sent 1 'job_result'" in bad.output(), 60, what="the hostile node to send its flood")
    runner.join(60)
    peak = mb(pid, "VmHWM")
    FIGURES["peak_mb_progress_flood"] = round(peak, 1)
    foreign = [e for e in events if e.get("type") == "progress" and e.get("node") != "good01"]
    print(f"{PROGRESS_FLOOD} progress messages for good01's job {job_id} from hostile01: {len(foreign)} shown in "
          f"the apply's event stream; master peak memory {before:.1f} -> {peak:.1f} MB")
    f.check(not foreign, f"{len(foreign)} progress events from hostile01 reached the apply of good01's job "
                         f"(e.g. {json.dumps(foreign[0])[:150]})" if foreign else "")
    f.check(peak - before < 60, f"the master's peak memory grew by {peak - before:.0f} MB under the progress flood")
    result = done.get("result") or {}
    f.check(result.get("nodes", {}).get("good01", {}).get("ok"), f"good01's job did not end well: {done}")
    f.check(set(result.get("nodes", {})) == {"good01"}, f"the job's report lists {sorted(result.get('nodes', {}))}")
    recorded = master.json("job", job_id, check=False)["nodes"].get("good01", {}).get("states") or [{}]
    f.check(recorded[0].get("id") == "slow",
            "hostile01's result for good01's job replaced good01's own")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 11. Tokens

def test_tokens_are_bound_listed_revocable_and_short_lived(tmp, master, hostile):
    f = Findings("join tokens")
    created = master.cli("token", "create", "--ids", "good*", "--uses", "5", "--ttl", "1h", "--address",
                         master.address, "--json", check=False)
    tokens_seen = []
    bound_id = None
    if f.check(created.returncode == 0, f"`token create --ids 'good*'` failed: {created.stderr.strip()[:200]}"):
        data = strict_json(created.stdout)
        token = data["token"]
        bound_id = data.get("id")
    else:
        token = token_of(master.token_config(uses=5))   # carry on with the other checks
    tokens_seen.append(token)
    intruder = hostile("bad01", facts=pi_facts("bad01", "dc:a6:32:66:66:01", "10.0.0.66"), token=token)
    fine = hostile("good01", facts=pi_facts("good01", "dc:a6:32:00:00:01", "10.0.0.1"), token=token)
    f.check(intruder.wait_answer(10) == "pending", f"bad01 enrolled with a token bound to good*: {intruder.status()}")
    f.check(fine.wait_answer(10) == "accepted", f"control: good01 was not enrolled by its token: {fine.status()}")

    listed = master.cli("token", "list", "--json", check=False)
    entry = None
    if f.check(listed.returncode == 0, f"`pimaster token list --json` failed: {listed.stderr.strip()[:200]}"):
        data = strict_json(listed.stdout)
        rows = data.get("tokens", [])
        f.check(rows and all({"id", "created", "expires", "uses_total", "uses_left", "ids", "address"} <= set(r)
                             for r in rows), f"`token list --json` rows lack fields: {rows[:1]}")
        f.check(not any(t in listed.stdout for t in tokens_seen), "`token list` shows the token itself")
        entry = next((r for r in rows if r.get("id") == bound_id or r.get("ids") in (["good*"], "good*")), None)
        f.check(entry is not None and entry.get("uses_left") == 4,
                f"`token list` does not show the bound token with 4 uses left: {rows}")
    if entry is not None:
        revoked = master.cli("token", "revoke", str(entry["id"]), check=False)
        f.check(revoked.returncode == 0, f"`token revoke {entry['id']}` failed: {revoked.stderr.strip()[:200]}")
        f.check(token not in revoked.stdout + revoked.stderr, "`token revoke` prints the token")
        late = hostile("good02", facts=pi_facts("good02", "dc:a6:32:00:00:02", "10.0.0.2"), token=token)
        f.check(late.wait_answer(10) == "pending", f"good02 enrolled with a revoked token: {late.status()}")
    else:
        f.check(False, "could not revoke the token (no `token list` entry for it)")

    long = master.cli("token", "create", "--ttl", "31d", "--json", check=False)
    f.check(long.returncode != 0, "`token create --ttl 31d` was not refused (the maximum is 30 days)")
    if long.returncode == 0:
        tokens_seen.append(strict_json(long.stdout)["token"])
    month = master.cli("token", "create", "--ttl", "30d", "--json", check=False)
    f.check(month.returncode == 0, f"control: `token create --ttl 30d` was refused: {month.stderr.strip()[:200]}")

    # A second key claims good01's id: denied, and the log names where it came from.
    imposter = hostile("good01", name="good01-imposter", facts=pi_facts("good01", "dc:a6:32:66:66:02", "10.0.0.67"))
    imposter.wait_answer(5)
    wait_for(lambda: "denied" in master.key_state("good01"), 10, what="the second key of good01 to be denied")
    fp = imposter.fingerprint()
    lines = [line for line in master.output().splitlines() if fp and fp in line]
    print("log lines about the imposter's key:", *lines[:3], sep="\n  ")
    f.check(any("127.0.0.1" in line for line in lines),
            f"the master's warning about the denied key does not name the claimant's address: {lines[:2]}")
    replace = master.cli("keys", "accept", "--replace", "good01", check=False)
    f.check(replace.returncode != 0 and "--fingerprint" in replace.stderr,
            f"`keys accept --replace good01` without --fingerprint was not refused (exit {replace.returncode}): "
            f"{(replace.stdout + replace.stderr).strip()[:200]}")
    accepted = [k["fingerprint"] for k in master.json("keys", "list")["keys"]
                if k["id"] == "good01" and k["state"] == "accepted"]
    f.check(accepted == [fine.fingerprint()], f"good01's accepted key is now {accepted}, not the original one")
    if replace.returncode != 0:
        chosen = master.cli("keys", "accept", "--replace", "good01", "--fingerprint", fp, check=False)
        f.check(chosen.returncode == 0, f"control: `keys accept --replace good01 --fingerprint FP` failed: "
                                        f"{chosen.stderr.strip()[:200]}")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 12. Rate-limited logs and no tracebacks

def test_one_noisy_key_gets_a_few_log_lines_and_no_tracebacks(tmp, master, hostile):
    f = Findings("log flood from one key")
    import base64
    garbage = [base64.b64encode(os.urandom(n)).decode() for n in (1, 7, 100, 3000)]
    noisy = hostile("noisy01", facts=pi_facts("noisy01", "dc:a6:32:66:66:01", "10.0.0.66"), send=[
        {"enroll": True, "token": "not-a-token", "repeat": 300},
        {"enroll": True, "id": "someone-else", "repeat": 100},
        {"enroll": True, "id": "bad id!", "repeat": 100},
        {"type": "job_result", "body": {"job": "x", "results": [], "summary": {}}, "repeat": 100},
        {"type": "nonsense", "body": {}, "repeat": 100},
        {"type": "enroll", "body": {"id": "noisy01", "facts": "not a map", "catalog": [1]}, "repeat": 100},
        *({"raw_b64": g, "repeat": 50} for g in garbage),
        {"raw_msgpack": {"v": 1, "type": "enroll", "id": "x", "ts": float("nan"), "body": {}}, "repeat": 50},
        {"frames_b64": garbage[:3], "repeat": 50},
        {"type": "enroll", "body": {"id": "noisy01", "facts": {"hostname": "n\nx", "cpu_count": "four",
                                                                "ips": ["999.1.1.1"], "macs": ["zz"],
                                                                "memory_mb": float("nan")}}, "repeat": 100},
        {"type": "heartbeat", "body": {}},
    ])
    wait_for(lambda: "sent 1 'heartbeat'" in noisy.output(), 60, what="the noisy key to send everything")
    time.sleep(1.5)
    fp = noisy.fingerprint()
    log = master.output()
    about = [line for line in log.splitlines() if (fp and fp in line) or "noisy01" in line or "someone-else" in line]
    FIGURES["log_lines_one_noisy_key"] = len(about)
    print(f"one key sent {300 + 100 + 100 + 100 + 100 + 100 + 200 + 50 + 50 + 100} bad messages: {len(about)} log "
          f"lines about it; e.g.", *about[:4], sep="\n  ")
    f.check(len(about) <= 30, f"{len(about)} log lines about one key: not rate-limited per key")
    status = master.cli("status", "--json", check=False)
    f.check(status.returncode == 0, "the master does not answer `status` after the noise")
    everywhere = {str(p): p.read_text(errors="replace").count("Traceback") for p in MASTER_LOGS + [master.log_path]
                  if p.exists()}
    FIGURES["master_logs_with_traceback"] = sum(1 for n in everywhere.values() if n)
    f.check(not any(everywhere.values()),
            f"tracebacks in master logs of this module's tests: { {k: v for k, v in everywhere.items() if v} }")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------
# 13-18: found by attacking the hardened master (a review as a root-compromised Pi)

def test_a_message_flood_does_not_starve_the_master(tmp, master, start_agent, hostile):
    f = Findings("message flood starves the master")
    start_agent("good01", master.token_config(uses=2))
    honest_up(master)
    beat = {"type": "heartbeat", "body": {}, "repeat": 200_000}
    hostile("stranger01", no_enroll=True, send=[beat])
    hostile("flooder01", facts=pi_facts("flooder01", "dc:a6:32:66:66:02", "10.0.0.67"),
            token=token_of(master.token_config(uses=1)), send=[beat])
    time.sleep(3)  # both floods under way
    waits = []
    for _ in range(5):
        started = time.monotonic()
        rc, data = master.ping("good01", timeout=5)
        waits.append(time.monotonic() - started)
        f.check(rc == 0 and [n["ok"] for n in data.get("nodes", [])] == [True],
                f"`pimaster ping good01` failed during the flood: {data}")
    status = master.json("status")
    FIGURES["ping_s_under_flood"] = round(max(waits), 2)
    print(f"ping during two floods of 200,000 messages: slowest {max(waits):.2f} s; "
          f"rate-limited {status['rate_limited_messages']} messages")
    f.check(status["rate_limited_messages"] > 0, "no message was rate-limited")
    f.verdict(master)


def test_one_key_holds_one_connection(tmp, master, hostile):
    f = Findings("one key, many connections")
    import zmq

    node = hostile("multi01", facts=pi_facts("multi01", "dc:a6:32:66:66:03", "10.0.0.68"),
                   token=token_of(master.token_config(uses=1)))
    assert node.wait_answer(10) == "accepted", node.output()
    secret = node.key.read_bytes().strip()
    public = zmq.curve_public(secret)
    server_key = (master.state_dir / "master.pub").read_bytes().strip()
    before = open_fds(master.proc.pid)
    ctx = zmq.Context()
    try:
        socks = []
        for _ in range(200):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.reconnect_ivl = -1
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
            sock.connect(f"tcp://{master.address}")
            socks.append(sock)
        from piagent import protocol as proto
        for sock in socks:
            sock.send(proto.encode(proto.Message(type=proto.HEARTBEAT)))
        peak = open_fds(master.proc.pid)
        settled = wait_for(lambda: (n := open_fds(master.proc.pid)) < before + 20 and n, 30,
                           what="the master to keep one connection per key")
        print(f"200 connections on one accepted key: master fds {before} -> {peak} -> {settled}")
        f.check(settled < before + 20, f"the master holds {settled - before} more descriptors")
    finally:
        ctx.destroy(linger=0)
    f.verdict(master)


def test_one_nodes_catalogue_fails_only_its_own_job(tmp, master, start_agent, hostile):
    f = Findings("one catalogue refuses every apply")
    config = master.token_config(uses=3)
    start_agent("good01", config)
    honest_up(master)
    bad = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:04", "10.0.0.69"), token=token_of(config))
    assert bad.wait_answer(10) == "accepted", bad.output()
    bad.command({"type": "enroll", "body": {"id": "hostile01", "catalog": {"x.y": {"args": []}},
                                            "facts": pi_facts("hostile01", "dc:a6:32:66:66:04", "10.0.0.69")}})
    time.sleep(1)
    state = write(tmp / "site6" / "hello.yaml", f"""
        {tmp}/hello-{{{{ node.id }}}}:
          file.managed:
            - contents: hi
        """)
    result, report = apply_json(master, str(state))
    print("apply:", outcome(result, report))
    f.check(report is not None, f"the apply was refused for everyone: {result.stderr.strip()[:300]}")
    if report:
        f.check(report["nodes"]["good01"]["ok"], "good01's job did not succeed")
        f.check(not report["nodes"]["hostile01"]["ok"], "hostile01's job succeeded with a catalogue without file.managed")
        f.check((tmp / "hello-good01").exists(), "good01's file was not written")
    f.verdict(master)


def test_keys_all_with_a_fingerprint_takes_only_that_key(tmp, master, hostile):
    f = Findings("--all ignores --fingerprint")
    a = hostile("wait01", facts=pi_facts("wait01", "dc:a6:32:66:66:05", "10.0.0.70"))
    b = hostile("wait02", facts=pi_facts("wait02", "dc:a6:32:66:66:06", "10.0.0.71"))
    for node in (a, b):
        assert node.wait_answer(10) == "pending", node.output()
    accepted = master.json("keys", "accept", "--all", "--yes", "--fingerprint", a.fingerprint())["accepted"]
    f.check([k["id"] for k in accepted] == ["wait01"], f"accepted {accepted}")
    f.check(master.key_state("wait02") == ["pending"], "wait02 was accepted too")
    f.verdict(master)


def test_a_node_cannot_rewrite_its_reported_results(tmp, master, hostile):
    f = Findings("a node rewrites its past results")
    node = hostile("hostile01", facts=pi_facts("hostile01", "dc:a6:32:66:66:07", "10.0.0.72"),
                   token=token_of(master.token_config(uses=1)))
    assert node.wait_answer(10) == "accepted", node.output()
    state = write(tmp / "site7" / "x.yaml", """
        x:
          cmd.run:
            - name: "true"
        """)
    result, report = apply_json(master, str(state))
    f.check(report is not None and report["nodes"]["hostile01"]["ok"], f"control: {outcome(result, report)}")
    job_id = report["job"] if report else None
    node.command({"type": "job_result", "body": {"job": job_id, "summary": {}, "results": [
        {"id": "x", "fun": "cmd.run", "name": "true", "result": False, "changes": {}, "comment": "rewritten"}]}})
    time.sleep(1.5)
    again = master.json("job", job_id, check=False) if job_id else {}
    f.check("rewritten" not in json.dumps(again), "the job now shows the result sent afterwards")
    f.verdict(master)


# ---------------------------------------------------------------------------------------------

def test_zz_summary():
    tried = len(ATTACKS)
    succeeded = sorted(name for name, outcome in ATTACKS.items() if outcome != "held")
    print(f"\nhostile summary: attacks tried {tried}, succeeded {len(succeeded)}"
          + (f" ({', '.join(succeeded)})" if succeeded else "")
          + f"; master peak memory under the 16 MiB frames {FIGURES.get('peak_mb_big_frames', '-')} MB"
          + f", under the progress flood {FIGURES.get('peak_mb_progress_flood', '-')} MB"
          + f"; after 600 strangers' enrollments: pending keys {FIGURES.get('pending_after_flood', '-')}, "
            f"database {FIGURES.get('db_mb_after_flood', '-')} MB, {FIGURES.get('log_lines_in_flood', '-')} log lines"
          + f"; idle flood fds {FIGURES.get('idle_fds_peak', '-')} -> {FIGURES.get('idle_fds_after', '-')}"
          + f"; log lines about one noisy key {FIGURES.get('log_lines_one_noisy_key', '-')}")
    assert tried > 0
