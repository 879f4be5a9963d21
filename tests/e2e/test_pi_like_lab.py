"""Lab nodes that look like Pis: `pimaster lab set` makes node03 hot and under-voltage, and the agent
reads it where it reads a real Pi's (thermal zone, `vcgencmd get_throttled`), so `pimaster ping`
reports it; the facts carry each node's Pi model and serial; /boot/firmware holds a bookworm image's
cmdline.txt and config.txt.

Faked, because a container cannot have them: the device tree (a read-only bind over /sys/firmware),
the thermal zone (a bind over /sys/class/thermal) and the VideoCore firmware (a vcgencmd stand-in).
"""

from __future__ import annotations

import json

import pytest

from lab_harness import Lab, describe, pimaster_cli

HOT = "node03"
UNDER_VOLTAGE_AND_THROTTLED = {"under-voltage", "throttled", "under-voltage-occurred", "throttled-occurred"}


def _status() -> dict[str, dict]:
    status = pimaster_cli("lab", "status", "--json")
    return {n["name"]: n for n in json.loads(status.stdout)["nodes"]}


def _ping(lab: Lab) -> dict[str, dict]:
    result = lab.pimaster("ping", "--json", check=False)
    assert result.returncode == 0, describe(result)
    return {n["id"]: n for n in json.loads(result.stdout)["nodes"]}


@pytest.mark.lab
def test_lab_set_hot_and_under_voltage_shows_in_ping_and_nodes_are_pis_fake_device_tree_thermal_vcgencmd(lab: Lab):
    before = _status()
    assert before[HOT]["pi"]["throttled"] == "0x0", before[HOT]
    lab.set(HOT, temp="82", throttled="0x50005")
    try:
        # The stand-in answers as the real tool does, and the thermal zone reads as a Pi's.
        assert lab.exec(HOT, "vcgencmd", "get_throttled").stdout == "throttled=0x50005\n"
        assert lab.exec(HOT, "cat", "/sys/class/thermal/thermal_zone0/temp").stdout == "82000\n"
        ping = _ping(lab)
        hot = ping[HOT]
        assert hot["temp_c"] == 82.0 and hot["throttled"] == "0x50005", hot
        assert set(hot["throttled_flags"]) == UNDER_VOLTAGE_AND_THROTTLED, hot
        for node in set(lab.nodes) - {HOT}:
            assert ping[node]["throttled"] == "0x0" and ping[node]["throttled_flags"] == [], ping[node]
            assert ping[node]["temp_c"] == before[node]["pi"]["temp_c"] != 82.0, ping[node]
        table = lab.pimaster("ping").stdout
        row = next(line for line in table.splitlines() if line.startswith(HOT))
        assert "82.0°C" in row and "under-voltage" in row, table
        status = _status()[HOT]["pi"]
        assert status["temp_c"] == 82.0 and status["throttled"] == "0x50005", status

        # Refused, and nothing changes: an unknown key (the known ones are listed), bad values.
        for bad, says in (("fan=on", "temp"), ("temp=900", "900"), ("temp=hot", "hot"), ("throttled=0xzz", "0xzz"),
                          ("throttled=0x100000000", "32-bit")):
            refused = pimaster_cli("lab", "set", HOT, "temp=20", bad)
            assert refused.returncode == 2 and says in refused.stderr, describe(refused)
        assert _status()[HOT]["pi"] == status
    finally:
        lab.set(HOT, temp=str(before[HOT]["pi"]["temp_c"]), throttled="0x0")

    # Facts: each node's Pi model and its own serial, as the lab made them (node01 is a Pi 5).
    facts = {n["id"]: n["facts"] for n in json.loads(lab.pimaster("nodes", "--json").stdout)["nodes"]}
    for node in lab.nodes:
        assert facts[node]["pi_model"] == before[node]["pi"]["model"], facts[node]
        assert facts[node]["pi_serial"] == before[node]["pi"]["serial"], facts[node]
    assert facts[HOT]["pi_model"] == "Raspberry Pi 4 Model B Rev 1.5"
    assert facts["node01"]["pi_model"].startswith("Raspberry Pi 5 Model B")
    assert len({f["pi_serial"] for f in facts.values()}) == len(lab.nodes)

    # The boot partition of a bookworm image: config.txt's sections, cmdline.txt's one line with the
    # node's own root partition.
    config = lab.exec("node02", "cat", "/boot/firmware/config.txt").stdout.splitlines()
    assert {"[pi4]", "[all]", "[cm4]"} <= set(config) and "arm_boost=1" in config
    cmdlines = {node: lab.exec(node, "cat", "/boot/firmware/cmdline.txt").stdout for node in lab.nodes}
    for line in cmdlines.values():
        assert line.count("\n") == 1 and " rootwait" in line and "root=PARTUUID=" in line, line
    assert len(set(cmdlines.values())) == len(lab.nodes)

    # The lab's master exports metrics on node01's loopback (what it serves is tested elsewhere).
    exec_start = lab.exec("node01", "systemctl", "show", "-p", "ExecStart", "--value", "pimaster").stdout
    assert "--metrics 127.0.0.1:9466" in exec_start, exec_start
