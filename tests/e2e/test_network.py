"""states/network.yaml and network.static on the 4-node lab: names, addresses, moving, rolling back.

The lab nodes run systemd-networkd (as minimal images do); their addresses are real addresses in
their own network namespaces on the lab bridge, so moving one really cuts the agent's connection,
and the agent must report first, reconnect from the new address, or roll back by itself. The
master never sees anything but the agent's messages; every check inside a node goes through the
lab harness (nsenter), never through the network.

Every test leaves the lab as `lab up` made it (names and addresses of states/cluster.yaml): the
other e2e tests rely on them.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from lab_harness import Lab
from test_shipped_states import MASTER, NODE_STATES, apply, assert_every_node_done, changed, failures, figures, sh

pytestmark = pytest.mark.lab

MOVED_NODE, MOVED_IP, MOVED_NAME = "node04", "10.77.0.24", "pi04"
WORK = "/root/network-test"    # a copy of the shipped states in node01, with an edited inventory


def hosts_entries(lab: Lab, node: str) -> dict[str, str]:
    """name -> address, from the node's /etc/hosts (loopback lines left out)."""
    entries = {}
    for line in sh(lab, node, "cat /etc/hosts").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and not words[0].startswith(("127.", "::1", "ff02:")):
            for name in words[1:]:
                entries[name] = words[0]
    return entries


def agent_log(lab: Lab, node: str, since: str) -> str:
    return sh(lab, node, f"journalctl -u piagent --no-pager -o cat --since '{since}'", check=False)


def node_clock(lab: Lab, node: str) -> str:
    return sh(lab, node, "date '+%Y-%m-%d %H:%M:%S'").strip()


def reported_ips(lab: Lab, node: str) -> list[str]:
    """The addresses the master knows for NODE (`pimaster nodes`: the facts of its latest connection)."""
    nodes = json.loads(lab.pimaster("nodes", "--json").stdout)["nodes"]
    return next(n["facts"].get("ips", []) for n in nodes if n["id"] == node)


def ping_entry(lab: Lab, node: str) -> dict:
    nodes = json.loads(lab.pimaster("ping", node, "--json", check=False).stdout or '{"nodes": []}')["nodes"]
    return nodes[0] if nodes else {}


def wait_settled(lab: Lab, nodes: list[str]) -> None:
    """Every change put in effect and confirmed (no pending record), every node answering."""
    lab.wait_for(lambda: all(sh(lab, n, "test -e /var/lib/piagent/network-pending.json && echo pending",
                                check=False).strip() == "" for n in nodes), "network changes confirmed", 90)
    lab.wait_for(lambda: lab.all_up(), "every node answering", 60)


def test_network_yaml_names_and_addresses_every_node_still_answering(lab):
    first, t1, _ = apply(lab, "network")
    assert_every_node_done(first, lab)
    assert failures(first) == {}
    wait_settled(lab, lab.nodes)
    inventory = yaml.safe_load(sh(lab, MASTER, f"cat {NODE_STATES}/cluster.yaml"))["nodes"]
    want = {entry["id"]: entry["ip"] for entry in inventory}
    for node in lab.nodes:
        assert sh(lab, node, "hostname").strip() == node
        assert lab.addresses(node) == [want[node]], f"{node} has {lab.addresses(node)}"
        # networkd uses the state's file for eth0 now, not the image's own.
        status = sh(lab, node, "networkctl status eth0 --no-pager", check=False)
        assert "00-pimaster-eth0.network" in status, status
        entries = hosts_entries(lab, node)
        assert {n: entries.get(n) for n in want} == want
    second, t2, _ = apply(lab, "network")
    assert_every_node_done(second, lab)
    assert changed(second) == {n: [] for n in lab.nodes}
    figures("network.yaml", t1, t2)


def test_network_yaml_moves_a_node_which_reports_first_then_answers_from_its_new_address(lab):
    sh(lab, MASTER, f"rm -rf {WORK} && cp -r {NODE_STATES} {WORK}")
    inventory = yaml.safe_load(sh(lab, MASTER, f"cat {WORK}/cluster.yaml"))
    entry = next(e for e in inventory["nodes"] if e["id"] == MOVED_NODE)
    entry.update(ip=MOVED_IP, hostname=MOVED_NAME)
    lab.write_file(MASTER, f"{WORK}/cluster.yaml", yaml.safe_dump(inventory, sort_keys=False))
    try:
        since = node_clock(lab, MOVED_NODE)
        report, elapsed, _ = apply(lab, f"{WORK}/network.yaml")
        # The result came from the old address: the move is in it, before it took effect.
        assert report["nodes"][MOVED_NODE]["status"] == "done"
        moved = next(s for s in report["nodes"][MOVED_NODE]["states"] if s["fun"] == "network.static")
        assert moved["status"] == "changed" and MOVED_IP in moved["comment"], moved
        started = time.monotonic()
        # At once, while node04 is moving: the master follows it to its new connection, and the
        # second run changes nothing (as `apply network && apply time` in a script needs).
        again, _, _ = apply(lab, f"{WORK}/network.yaml")
        assert_every_node_done(again, lab)
        assert changed(again) == {n: [] for n in lab.nodes}
        wait_settled(lab, [MOVED_NODE])
        back_after = time.monotonic() - started
        assert lab.addresses(MOVED_NODE) == [MOVED_IP]
        assert sh(lab, MOVED_NODE, "hostname").strip() == MOVED_NAME
        lab.wait_for(lambda: MOVED_IP in reported_ips(lab, MOVED_NODE), "the master to see the new address", 30)
        for node in lab.nodes:
            assert hosts_entries(lab, node).get(MOVED_NAME) == MOVED_IP
        log = agent_log(lab, MOVED_NODE, since)
        assert "network change confirmed" in log and "ROLLING BACK" not in log, log
        print(f"\nmoved {MOVED_NODE} to {MOVED_IP}: apply {elapsed:.1f} s, answering and confirmed "
              f"{back_after:.1f} s after the report")
    finally:
        # Back to the shipped inventory: the other tests expect node04 at its lab address and name.
        restored, _, _ = apply(lab, "network")
        assert failures(restored) == {}
        wait_settled(lab, lab.nodes)
        assert lab.addresses(MOVED_NODE) == [lab.ip(MOVED_NODE)]
        assert sh(lab, MOVED_NODE, "hostname").strip() == MOVED_NODE
        sh(lab, MASTER, f"rm -rf {WORK}")


STRANDED = """
eth0:
  network.static:
    - address: 10.77.9.13/24     # a subnet the master is not on: the agent cannot reach it from there
    - confirm_timeout: 15
"""


def test_an_address_cutting_the_node_off_is_rolled_back_also_across_an_agent_restart(lab):
    node = "node03"
    old_ip = lab.ip(node)
    apply(lab, "network", "--target", node)   # the shipped setting first, whatever ran before
    wait_settled(lab, [node])
    before = sh(lab, node, "cat /etc/systemd/network/00-pimaster-eth0.network", check=False)
    lab.write_file(MASTER, "/root/strand.yaml", STRANDED)
    since = node_clock(lab, node)
    report, _, _ = apply(lab, "/root/strand.yaml", "--target", node)
    state = report["nodes"][node]["states"][0]
    assert state["status"] == "changed" and "10.77.9.13/24" in state["comment"], state
    # In effect: the node has left the master's subnet and stops answering...
    lab.wait_for(lambda: "10.77.9.13" in lab.addresses(node), "the new address to take effect", 30)
    cut_at = time.monotonic()
    assert lab.ping(2).get(node) is False
    # ...the agent restarts inside the window (a crash, an update): the window starts afresh and
    # still ends in a rollback.
    lab.exec(node, "systemctl", "restart", "piagent")
    lab.wait_for(lambda: lab.addresses(node) == [old_ip], "the old address to come back", 90)
    lab.wait_for(lambda: lab.all_up([node]), f"{node} answering again", 60)
    back_after = time.monotonic() - cut_at
    assert sh(lab, node, "cat /etc/systemd/network/00-pimaster-eth0.network", check=False) == before
    log = agent_log(lab, node, since)
    assert "ROLLING BACK the network change (eth0 10.77.9.13/24)" in log, log
    assert "not confirmed yet" in log, log   # the restarted agent picked the window up
    note = ping_entry(lab, node).get("network_rollback")
    assert note and note["changes"] == [{"interface": "eth0", "address": "10.77.9.13/24"}], note
    table = lab.pimaster("ping", node).stdout
    assert "rolled back" in table, table
    print(f"\nstranded {node}: answering at {old_ip} again {back_after:.1f} s after the cut (window 15 s, "
          f"agent restarted inside it)")
    # The shipped file asks for the address the node has again: nothing to change, and the note
    # stays until a change is confirmed, so that nobody misses it.
    again, _, _ = apply(lab, "network", "--target", node)
    assert changed(again) == {node: []}
    assert ping_entry(lab, node).get("network_rollback")
    sh(lab, node, "rm -f /var/lib/piagent/network-rollback.json")


# ---------------------------------------------------------------------------------------------
# The network managers of Raspberry Pi OS: NetworkManager (bookworm) and dhcpcd (bullseye), each
# installed on a lab node in place of systemd-networkd, set up the way those images (and the seed
# guide, for dhcpcd) leave them.

NM_NODE, DHCPCD_NODE = "node02", "node03"
MOVES = """
eth0:
  network.static:
    - address: {{ '10.77.0.22' if node.id == 'node02' else '10.77.0.23' }}/24
    - gateway: 10.77.0.1
    - dns: [10.77.0.1]
    - confirm_timeout: 15
"""
NM_STRANDED = """
eth0:
  network.static:
    - address: 10.77.9.22/24
    - gateway: 10.77.9.1
    - confirm_timeout: 15
"""


def use_network_manager(lab: Lab, node: str) -> None:
    """As on bookworm: NetworkManager owns eth0 through one connection, "Wired connection 1"."""
    sh(lab, node, "apt-get install -y -q network-manager >/dev/null && "
                  "systemctl disable --now systemd-networkd.service systemd-networkd.socket 2>/dev/null; "
                  "for c in $(nmcli -g UUID connection show); do nmcli connection delete uuid $c >/dev/null; done; "
                  f"nmcli connection add type ethernet ifname eth0 con-name 'Wired connection 1' "
                  f"ipv4.method manual ipv4.addresses {lab.ip(node)}/24 >/dev/null", timeout=300)


def use_dhcpcd(lab: Lab, node: str) -> None:
    """As on bullseye, with the seed guide's hand-made stanza for eth0 at the end of dhcpcd.conf."""
    sh(lab, node, "apt-get install -y -q dhcpcd >/dev/null && "
                  "systemctl disable --now systemd-networkd.service systemd-networkd.socket 2>/dev/null; "
                  # Lab only: nspawn nodes have no udev, and dhcpcd ignores interfaces udev has not
                  # announced unless told not to use it.
                  "sed -i '1i nodev' /etc/dhcpcd.conf && "
                  f"printf 'interface eth0\\nstatic ip_address={lab.ip(node)}/24\\n' >> /etc/dhcpcd.conf && "
                  "systemctl restart dhcpcd", timeout=300)


def back_to_networkd(lab: Lab, node: str, package: str) -> None:
    sh(lab, node, f"apt-get purge -y -q {package} >/dev/null; ip -4 addr flush dev eth0; "
                  "systemctl enable --now systemd-networkd.service systemd-networkd.socket 2>/dev/null; "
                  "networkctl reconfigure eth0", timeout=300)
    lab.wait_for(lambda: lab.addresses(node) == [lab.ip(node)], f"{node}'s lab address again", 60)


def nm_ipv4(lab: Lab, node: str) -> dict[str, str]:
    out = sh(lab, node, "nmcli -t -f ipv4.method,ipv4.addresses,ipv4.gateway,ipv4.dns connection show "
                        "'Wired connection 1'")
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def test_network_static_through_networkmanager_and_dhcpcd_as_on_bookworm_and_bullseye(lab):
    try:
        use_network_manager(lab, NM_NODE)
        use_dhcpcd(lab, DHCPCD_NODE)
        for node in (NM_NODE, DHCPCD_NODE):
            lab.wait_for(lambda n=node: lab.addresses(n) == [lab.ip(n)], f"{node} set up", 60)
            lab.exec(node, "systemctl", "restart", "piagent")   # reconnect over the new manager
        lab.wait_for(lambda: lab.all_up([NM_NODE, DHCPCD_NODE]), "both nodes answering", 60)
        lab.write_file(MASTER, "/root/moves.yaml", MOVES)
        report, _, _ = apply(lab, "/root/moves.yaml", "--target", "node0[23]")
        assert {n: [s["status"] for s in i["states"]] for n, i in report["nodes"].items()} == \
            {NM_NODE: ["changed"], DHCPCD_NODE: ["changed"]}
        assert "(networkmanager)" in report["nodes"][NM_NODE]["states"][0]["comment"]
        assert "(dhcpcd)" in report["nodes"][DHCPCD_NODE]["states"][0]["comment"]
        wait_settled(lab, [NM_NODE, DHCPCD_NODE])
        assert lab.addresses(NM_NODE) == ["10.77.0.22"] and lab.addresses(DHCPCD_NODE) == ["10.77.0.23"]
        assert nm_ipv4(lab, NM_NODE) == {"ipv4.method": "manual", "ipv4.addresses": "10.77.0.22/24",
                                         "ipv4.gateway": "10.77.0.1", "ipv4.dns": "10.77.0.1"}
        conf = sh(lab, DHCPCD_NODE, "cat /etc/dhcpcd.conf")
        stanzas = [ln for ln in conf.splitlines() if ln.split() == ["interface", "eth0"]]
        assert len(stanzas) == 1 and "static ip_address=10.77.0.23/24" in conf, conf  # the guide's one taken over
        again, _, _ = apply(lab, "/root/moves.yaml", "--target", "node0[23]")
        assert changed(again) == {NM_NODE: [], DHCPCD_NODE: []}

        # A connection NetworkManager keeps is rolled back through nmcli, not by restoring files.
        lab.write_file(MASTER, "/root/nm-strand.yaml", NM_STRANDED)
        apply(lab, "/root/nm-strand.yaml", "--target", NM_NODE)
        lab.wait_for(lambda: "10.77.9.22" in lab.addresses(NM_NODE), "the stranding address in effect", 30)
        lab.wait_for(lambda: lab.addresses(NM_NODE) == ["10.77.0.22"], "the rollback", 90)
        lab.wait_for(lambda: lab.all_up([NM_NODE]), f"{NM_NODE} answering again", 60)
        assert nm_ipv4(lab, NM_NODE)["ipv4.addresses"] == "10.77.0.22/24"
        assert ping_entry(lab, NM_NODE).get("network_rollback")
    finally:
        back_to_networkd(lab, NM_NODE, "network-manager")
        back_to_networkd(lab, DHCPCD_NODE, "dhcpcd")
        for node in (NM_NODE, DHCPCD_NODE):
            sh(lab, node, "rm -f /var/lib/piagent/network-rollback.json /var/lib/piagent/network-pending.json")
            lab.exec(node, "systemctl", "restart", "piagent")
        lab.wait_for(lambda: lab.all_up(), "every node answering", 90)
