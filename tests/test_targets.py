"""One target syntax for every command that acts on nodes (issue 13): globs on ids, comma lists,
`role:NAME`, `FACT=GLOB`, terms separated by spaces all of which must match; unknown facts and
targets that match nothing are refused, saying so.

Loopback: a real master, real agents (node01-03: this machine's facts) and, since this machine
cannot be a Raspberry Pi, agents that report a Pi's facts (`fake_pi`: tests/hostile_agent.py,
which speaks the real protocol and answers ping and apply). One of them reports glob characters
as its model: a fact is data, never a pattern.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from harness import wait_for
from test_hostile import Hostile, pi_facts, token_of

from pimaster.errors import ControlError


def _fake_pi(tmp, master, processes, node_id: str, token: str, **facts) -> Hostile:
    """A node that reports a Pi's facts (``facts`` replace some of them): this machine is no Pi."""
    number = len([p for p in processes if isinstance(p, Hostile)]) + 1
    reported = dict(pi_facts(node_id, f"dc:a6:32:00:00:0{number}", f"10.0.0.{number}",
                             serial=f"10000000cafe000{number}"), **facts)
    node = Hostile(tmp, master, node_id, facts=reported, token=token).start()
    processes.append(node)
    assert node.wait_answer(15) == "accepted", node.output()
    return node


@pytest.fixture
def cluster(tmp, master, start_agent, processes):
    """node01-03 (real agents, this machine's facts), pi05 (reports a Pi 5, arm64, bookworm) and
    odd01 (reports a Pi whose model is `*`, armhf, bullseye). Yields the master and node01's facts."""
    config = master.token_config(uses=10)
    for node_id in ("node01", "node02", "node03"):
        start_agent(node_id, config)
    _fake_pi(tmp, master, processes, "pi05", token_of(config), pi_model="Raspberry Pi 5 Model B Rev 1.0")
    _fake_pi(tmp, master, processes, "odd01", token_of(config), pi_model="*", arch="armhf",
             os={"ID": "debian", "VERSION_ID": "11", "VERSION_CODENAME": "bullseye"})
    everyone = {"node01", "node02", "node03", "pi05", "odd01"}
    wait_for(lambda: master.up_nodes() == everyone, what="all five nodes up")
    facts = {n["id"]: n["facts"] for n in master.json("nodes")["nodes"]}
    assert facts["node01"]["arch"] not in ("arm64", "armhf"), "this test needs a machine that is not a Pi"
    return master, facts["node01"]


def _pinged(master, *target: str) -> tuple[int, list[str], dict]:
    code, data = master.ping(*target, timeout=3)
    return code, [n["id"] for n in data.get("nodes", [])], data


def test_ping_and_nodes_take_globs_comma_lists_roles_and_facts(cluster):
    master, own = cluster
    arch = own["arch"]  # this machine's (amd64 here), as its agents report it

    # A glob on ids ANDed with a fact term (ids first: after a fact, a word continues its glob).
    code, nodes, _ = _pinged(master, f"node0[12] arch={arch}")
    assert code == 0 and nodes == ["node01", "node02"]
    # The fact alone, and the nodes that report another one.
    assert _pinged(master, f"arch={arch}")[1] == ["node01", "node02", "node03"]
    assert _pinged(master, "arch=arm64")[1] == ["pi05"]
    assert _pinged(master, "--target", "arch=arm*")[1] == ["odd01", "pi05"]
    # Comma lists, each item a glob, alone and ANDed.
    assert _pinged(master, "node01,node03")[1] == ["node01", "node03"]
    # Leaving nodes out: every node but these.
    assert _pinged(master, "* !node0[12]")[1] == ["node03", "odd01", "pi05"]
    assert _pinged(master, f"!arch={arch} !odd01")[1] == ["pi05"]
    assert _pinged(master, "node01,pi*,odd*")[1] == ["node01", "odd01", "pi05"]
    assert _pinged(master, "node0*,pi05 arch=arm64")[1] == ["pi05"]
    # The names: model is the Pi model, os_codename the OS's; quotes group a glob too.
    assert _pinged(master, 'model="*Pi 5*"')[1] == ["pi05"]
    assert _pinged(master, "model=*Pi?5*")[1] == ["pi05"]
    assert _pinged(master, "os_codename=bullseye")[1] == ["odd01"]
    assert "pi05" in _pinged(master, "os_codename=bookworm os_version=12")[1]
    # A node's fact is data: odd01's model `*` is not a pattern that matches every glob...
    assert _pinged(master, "model=Raspberry*")[1] == ["pi05"]
    # ...and only a glob that matches the text `*` itself picks it.
    assert _pinged(master, "model=[*]")[1] == ["odd01"]
    # Numbers and true/false as they read.
    assert _pinged(master, "cpu_count=4 memory_mb=3794 systemd=true")[1] == ["odd01", "pi05"]

    # `pimaster nodes TARGET` (or --target) shows those nodes, with their facts.
    listed = master.json("nodes", "arch=arm*")["nodes"]
    assert sorted(n["id"] for n in listed) == ["odd01", "pi05"]
    assert {n["id"]: n["facts"]["arch"] for n in listed} == {"odd01": "armhf", "pi05": "arm64"}
    assert [n["id"] for n in master.json("nodes", "--target", "node01,node03")["nodes"]] == ["node01", "node03"]
    table = master.cli("nodes", f"node0[23] arch={arch}").stdout
    assert "node02" in table and "node03" in table and "node01" not in table and "pi05" not in table, table
    assert len(master.json("nodes")["nodes"]) == 5


def test_unknown_facts_and_targets_matching_nothing_are_refused_saying_so(cluster):
    master, own = cluster

    # An unknown fact: refused before anything is asked, naming the facts a target can match.
    for command in (["ping"], ["nodes"], ["jobs", "--target"], ["apply", "x.yaml", "--target"]):
        result = master.cli(*command, "colour=red", check=False)
        assert result.returncode == 2 and "no fact 'colour'" in result.stderr, (command, result)
        assert "arch" in result.stderr and "model (pi_model)" in result.stderr and "os_codename" in result.stderr
    # A fact with several values is not matchable, and the message says so.
    result = master.cli("ping", "ips=10.0.0.*", check=False)
    assert result.returncode == 2 and "ips is a list" in result.stderr, result
    # The master checks what any client sends (another client may send anything).
    from pimaster.client import ControlClient

    for bad in ("colour=red", "os=debian", "arch=", "node01,", "'node01", "x" * 300, ["node01"]):
        with pytest.raises(ControlError) as refused:
            ControlClient(str(master.state_dir)).call("ping", target=bad, timeout=1)
        assert refused.value.code == "refused", (bad, refused.value)

    # Nothing matches: refused (2), the JSON keeps "nodes", and the message says what each term matched.
    code, nodes, error = _pinged(master, "arch=sparc64")
    assert code == 2 and nodes == [] and error["code"] == "refused", error
    assert error["error"].startswith("no accepted node matches arch=sparc64"), error
    assert "'arm64'" in error["error"] and "'armhf'" in error["error"] and repr(own["arch"]) in error["error"]
    code, _, error = _pinged(master, "node0* arch=arm64")
    assert code == 2 and "no node matches all of them" in error["error"], error
    # A word after FACT=GLOB continues its glob (Pi models hold spaces): a node glob put there
    # matches nothing, and the message says where node globs go.
    assert _pinged(master, "model=*Pi 5*")[1] == ["pi05"]
    code, _, error = _pinged(master, "arch=arm64 pi0*")
    assert code == 2 and "put node globs first, or write them id=GLOB" in error["error"], error
    assert _pinged(master, "arch=arm64 id=pi0*")[1] == _pinged(master, "pi0* arch=arm64")[1] == ["pi05"]
    result = master.cli("nodes", "os_codename=trixie", "--json", check=False)
    assert result.returncode == 2 and "no accepted node matches os_codename=trixie" in json.loads(result.stdout)["error"]
    result = master.cli("nodes", "nope*", check=False)
    assert result.returncode == 2 and "no accepted node matches nope*" in result.stderr, result


def test_apply_and_jobs_mean_the_same_target(tmp, cluster):
    master, own = cluster
    arch = own["arch"]
    site = tmp / "site"
    site.mkdir()
    (site / "cluster.yaml").write_text(textwrap.dedent("""
        cluster:
          name: test
        nodes:
          - id: node01
            roles: [compute]
          - id: node02
            roles: [compute]
          - id: node03
            roles: [controller]
          - id: pi05
            roles: [compute]
          - id: odd01
            roles: [controller]
        """))
    state = site / "touch.yaml"
    state.write_text(f"{tmp}/touched-{{{{ node.id }}}}:\n  file.managed:\n    - contents: here\n")

    def apply(target: str):
        result = master.cli("apply", str(state), "--target", target, "--timeout", "1m", "--json", check=False)
        return result.returncode, json.loads(result.stdout)

    # Roles from the cluster.yaml apply reads, facts from what the agents reported: ANDed.
    code, report = apply(f"role:compute arch={arch}")
    assert code == 0 and sorted(report["nodes"]) == ["node01", "node02"], report
    real_job = report["job"]
    assert (tmp / "touched-node01").exists() and (tmp / "touched-node02").exists()
    assert not (tmp / "touched-node03").exists()
    code, report = apply('role:compute model="*Pi 5*"')
    assert code == 0 and list(report["nodes"]) == ["pi05"], report
    pi_job = report["job"]
    # Nothing matches: refused, nothing sent, and saying what each term matched.
    code, error = apply("role:controller arch=arm64")
    assert code == 2 and "no accepted node matches role:controller arch=arm64" in error["error"], error
    assert "role:controller matches node03, odd01" in error["error"], error
    code, error = apply("colour=red")
    assert code == 2 and "no fact 'colour'" in error["error"], error

    # ping reads the roles of the cluster.yaml the last apply read: the same nodes.
    assert _pinged(master, f"role:compute arch={arch}")[1] == ["node01", "node02"]
    assert _pinged(master, "role:compute arch=arm64")[1] == ["pi05"]
    assert _pinged(master, "role:controller os_codename=bullseye")[1] == ["odd01"]

    # jobs --target: ids (comma lists too), roles and facts as they are now, or that very target.
    listed = lambda *args: [j["id"] for j in master.json("jobs", *args)["jobs"]]  # noqa: E731
    assert listed("--target", "node01,node03") == [real_job]
    assert listed("--target", "node03,odd01") == []
    assert listed("--target", "pi05,node02") == [pi_job, real_job]
    assert listed("--target", "arch=arm64") == [pi_job]
    assert listed("--target", f"role:compute node02 arch={arch}") == [real_job]
    assert listed("--target", "os_codename=bullseye") == []


def test_a_fact_that_names_one_machine_never_picks_an_impostor_that_copies_it(tmp, cluster, processes):
    """Root on one Pi (imp06) copies pi05's serial: `pi_serial=` then picks neither, and says why;
    a serial one node alone reports still picks it. node01-03, three agents on this one machine,
    report the same hostname and machine id: those facts pick none of them."""
    master, own = cluster
    facts = {n["id"]: n["facts"] for n in master.json("nodes")["nodes"]}
    pi05, odd01 = facts["pi05"]["pi_serial"], facts["odd01"]["pi_serial"]
    assert _pinged(master, f"pi_serial={pi05}")[1] == ["pi05"]
    token = master.token_config(uses=1)
    _fake_pi(tmp, master, processes, "imp06", token_of(token), pi_serial=pi05, hostname=facts["pi05"]["hostname"])
    wait_for(lambda: "imp06" in master.up_nodes(), what="imp06 up")
    for term in (f"pi_serial={pi05}", f"hostname={facts['pi05']['hostname']}"):
        code, nodes, error = _pinged(master, term)
        assert code == 2 and nodes == [], (term, nodes)
        assert "imp06, pi05 report the same" in error["error"] and "target it by id" in error["error"], error
        result = subprocess.run([master.python, "-m", "pimaster", "--state-dir", str(master.state_dir), "run", term,
                                 "--", "true"], capture_output=True, text=True, env=master.env, timeout=60)
        assert result.returncode == 2 and "report the same" in result.stderr, result.stderr
    assert _pinged(master, f"pi_serial={odd01}")[1] == ["odd01"]
    assert _pinged(master, "pi_serial=10000000cafe*")[1] == ["odd01"]   # the others' serial is not theirs alone
    code, _, error = _pinged(master, f"hostname={own['hostname']}")
    assert code == 2 and "node01, node02, node03 report the same hostname" in error["error"], error
