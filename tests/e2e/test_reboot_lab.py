"""`pimaster reboot` and `pimaster shutdown` on the lab: real nspawn nodes rebooted by their agents
(`systemctl reboot` in a node exits nspawn with 133 and its supervisor boots it again, as a Pi comes
back) and powered off (`systemctl poweroff`: the node stays down). A lab node shares the host's
kernel, so its new boot shows in PID 1's start (and on the host as a new leader pid).
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from lab_harness import Lab, describe, pimaster_cli
from pimaster import lab as labmod

pytestmark = pytest.mark.lab

MASTER = labmod.MASTER_NODE
ROLLED = ["node02", "node03", "node04"]


def _run_watching(lab: Lab, nodes: list[str], *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, list[set]]:
    """`pimaster ARGS --json` in node01, in the background; meanwhile, samples of which of ``nodes``
    are down (no PID 1 on the host, or not answering ping). Returns the result and the samples."""
    proc = lab.spawn(MASTER, "pimaster", *args, "--json")
    samples: list[set] = []
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            without_init = {n for n in nodes if lab.leader(n) is None}
            answers = lab.ping(timeout=3)
            samples.append(without_init | {n for n in nodes if not answers.get(n)})
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        lab.reap(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), samples


def test_rolling_reboot_batch_1_never_has_two_nodes_down_and_each_comes_back_from_a_new_boot(lab):
    leaders = {n: lab.leader(n) for n in [MASTER, *ROLLED]}
    result, samples = _run_watching(lab, ROLLED, "reboot", "node0[2-4]", "--batch", "1", "--timeout", "3m")
    assert result.returncode == 0, describe(result)
    report = json.loads(result.stdout)
    assert report["order"] == ROLLED and report["master_node"] is None
    assert all(report["nodes"][n]["state"] == "back" for n in ROLLED), report
    # Each node was seen down at some point, never two at once.
    assert set().union(*samples) == set(ROLLED), samples
    assert all(len(down) <= 1 for down in samples), samples
    for node in ROLLED:  # a new boot: a new PID 1
        assert lab.leader(node) not in (None, leaders[node])
    assert lab.leader(MASTER) == leaders[MASTER]


def test_only_required_picks_exactly_the_nodes_an_apply_said_need_a_reboot(lab):
    cmdline = "/boot/firmware/cmdline.txt"
    with lab.keep_files("node03", cmdline):  # the lab's own bookworm cmdline.txt comes back afterwards
        lab.exec("node03", "sh", "-c", f"cat > {cmdline}", input="console=tty1 root=/dev/mmcblk0p2 rootwait\n")
        lab.write_file(MASTER, "/root/reboot-cgroups.yaml",
                       "cgroups:\n  boot.cmdline:\n    - present: [cgroup_enable=memory]\n")
        applied = lab.pimaster("apply", "/root/reboot-cgroups.yaml", "--target", "node03", "--json", check=False)
        assert json.loads(applied.stdout)["nodes"]["node03"]["reboot_required"] is True, describe(applied)
        leader = lab.leader("node03")
        result = lab.pimaster("reboot", "node0[2-4]", "--only-required", "--json", check=False, timeout=300)
        assert result.returncode == 0, describe(result)
        report = json.loads(result.stdout)
        assert report["order"] == ["node03"] and set(report["skipped"]) == {"node02", "node04"}
        assert lab.leader("node03") not in (None, leader)
        # Booted since: none needs it now.
        again = json.loads(lab.pimaster("reboot", "node0[2-4]", "--only-required", "--json").stdout)
        assert again["order"] == []


def test_the_masters_own_node_goes_last_and_the_master_comes_back_with_it(lab):
    leaders = {n: lab.leader(n) for n in (MASTER, "node04")}
    result = lab.pimaster("reboot", "node0[14]", "--batch", "1", check=False, timeout=300)
    assert result.returncode == 0, describe(result)
    assert "note: node01 runs this master: it goes last" in result.stdout
    lines = result.stdout.splitlines()
    assert lines.index("node04: rebooting") < lines.index("node01: rebooting")
    assert any(line.startswith("node04: back after") for line in lines), lines
    Lab.wait_for(lambda: lab.leader(MASTER) not in (None, leaders[MASTER]), "node01 to boot again", timeout=60)
    Lab.wait_for(lambda: lab.all_up(), "every node answering the restarted master", timeout=180, interval=2)
    assert lab.leader("node04") != leaders["node04"]


def _accepted_fingerprint(lab: Lab, node: str) -> str | None:
    keys = json.loads(lab.pimaster("keys", "list", "--json").stdout)["keys"]
    return next((k["fingerprint"] for k in keys if k["id"] == node and k["state"] == "accepted"), None)


def test_shutdown_powers_a_node_off_it_stays_off_and_lab_start_boots_it_with_its_key(lab):
    master_fp = json.loads(lab.pimaster("keys", "fingerprint", "--json").stdout)["master"]
    node_fp = _accepted_fingerprint(lab, "node04")
    assert node_fp
    refused = lab.pimaster("shutdown", "node04", check=False)  # not on a terminal, no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert lab.all_up(["node04"])
    result = lab.pimaster("shutdown", "node04", "--yes", "--json", check=False, timeout=300)
    assert result.returncode == 0, describe(result)
    assert json.loads(result.stdout)["nodes"]["node04"]["state"] == "off"
    Lab.wait_for(lambda: lab.leader("node04") is None, "node04's PID 1 to end", timeout=60)
    time.sleep(5)  # off stays off: the supervisor does not boot it again
    assert lab.leader("node04") is None
    status = json.loads(pimaster_cli("lab", "status", "--json").stdout)
    assert {n["name"]: n["state"] for n in status["nodes"]}["node04"] == "stopped"
    assert status["up"] is True and status["stopped"] == ["node04"]
    jobs = lab.job_ids()

    # The power button: the same node comes back, with its own root file system and key.
    started = pimaster_cli("lab", "start", "node04")
    assert started.returncode == 0, describe(started)
    Lab.wait_for(lambda: lab.all_up(["node04"]), "node04 to answer ping again", timeout=120, interval=1)
    assert _accepted_fingerprint(lab, "node04") == node_fp
    assert json.loads(lab.pimaster("keys", "fingerprint", "--json").stdout)["master"] == master_fp
    assert set(jobs) <= set(lab.job_ids())
    again = pimaster_cli("lab", "start", "node04", "node09")
    assert again.returncode == 2 and "node09" in again.stderr, describe(again)
    again = pimaster_cli("lab", "start", "node04")
    assert again.returncode == 2 and "node04 is running" in again.stderr, describe(again)
