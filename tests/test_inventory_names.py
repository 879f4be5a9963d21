"""Names the master gives enrolled nodes that cluster.yaml does not list (`name_pattern`): never one
that another node has already (master/inventory.py, resolve_nodes)."""

from pimaster.inventory import parse_inventory, resolve_nodes

CLUSTER = """
cluster:
  subnet: 10.77.0.0/24
  name_pattern: "node{:02d}"
  first_host: 15
  default_roles: [compute]
nodes:
""" + "".join(f"  - id: node0{i}\n    ip: 10.77.0.1{i}\n    roles: [compute]\n" for i in range(1, 5))


def facts(name: str, ip: str) -> dict:
    return {"hostname": name, "ips": [ip]}


def test_a_node_whose_id_is_a_name_given_to_another_node_gets_another_name():
    """node05 and node06 were added, then `lab add --name nodeX6`, which the pattern named node07;
    a later Pi whose id is node07 must not be named node07 too (two node07 in /etc/hosts and
    slurm.conf: slurmctld refuses to start)."""
    inventory = parse_inventory(CLUSTER, "cluster.yaml")
    earlier = {"node05": {"hostname": "node05", "ip": "10.77.0.15"},
               "node06": {"hostname": "node06", "ip": "10.77.0.16"},
               "nodeX6": {"hostname": "node07", "ip": "10.77.0.17"}}
    nodes = {f"node0{i}": facts(f"node0{i}", f"10.77.0.1{i}") for i in range(1, 7)}
    nodes["nodeX6"] = facts("node07", "10.77.0.17")
    nodes["node07"] = facts("node07", "10.77.0.18")
    resolved, new = resolve_nodes(inventory, nodes, earlier)
    hostnames = [item["hostname"] for item in resolved.values()]
    assert sorted(hostnames) == sorted(set(hostnames)), resolved
    assert resolved["nodeX6"]["hostname"] == "node07"          # it keeps the name it was given
    assert resolved["node07"]["hostname"] == "node08"
    assert new["node07"]["hostname"] == "node08"
