"""states/kubeadm.yaml on loopback: what can be judged without a cluster (the lab test,
tests/e2e/test_kubeadm_fake_kubeadm_kubelet.py, applies it for real).

A node with a 32-bit userland is refused before anything is done on it. This machine is 64-bit:
the agent here runs with a stand-in `dpkg` first on its PATH that answers `--print-architecture`
with armhf, as Raspberry Pi OS 32-bit does (even on a 64-bit kernel), and passes everything else
to the real dpkg.
"""

import json
import os
import shutil
import textwrap
from pathlib import Path

from harness import Agent, wait_for

STATES = Path(__file__).resolve().parents[1] / "states"


def test_kubeadm_refuses_32bit_userland_before_anything_fake_dpkg_says_armhf(tmp, master, processes):
    fake_bin = tmp / "fake-bin"
    fake_bin.mkdir()
    dpkg = fake_bin / "dpkg"
    dpkg.write_text('#!/bin/sh\nif [ "$1" = --print-architecture ]; then echo armhf; exit 0; fi\n'
                    'exec /usr/bin/dpkg "$@"\n')
    dpkg.chmod(0o755)
    agent = Agent(tmp, "pi32", master.token_config(uses=1))
    agent.env["PATH"] = f"{fake_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    agent.start()
    processes.append(agent)
    wait_for(lambda: master.up_nodes() == {"pi32"}, what="agent up")
    nodes = master.json("nodes")["nodes"]
    assert nodes[0]["facts"]["arch"] == "armhf", nodes

    site = tmp / "site"
    shutil.copytree(STATES, site)
    (site / "cluster.yaml").write_text(textwrap.dedent("""
        cluster:
          kubernetes:
            version: "1.32"
        nodes:
          - id: pi32
            ip: 127.0.0.1
            roles: [control-plane]
        """))
    state = site / "kubeadm.yaml"

    # Test mode first (it changes nothing): the node's job is the refusal and nothing else.
    would = json.loads(master.cli("apply", str(state), "--test", "--json").stdout)
    assert [s["id"] for s in would["nodes"]["pi32"]["states"]] == ["kubernetes-64-bit"], would

    result = master.cli("apply", str(state), "--json", check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)["nodes"]["pi32"]
    assert [(s["id"], s["status"]) for s in report["states"]] == [("kubernetes-64-bit", "failed")]
    said = report["states"][0]["changes"]["stderr"]
    assert "pi32 runs a 32-bit userland (armhf" in said and "Kubernetes needs a 64-bit OS" in said, said

    # The person sees it as it is, in the apply's own output.
    shown = master.cli("apply", str(state), check=False).stdout
    assert "32-bit userland (armhf" in shown
