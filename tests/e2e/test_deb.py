"""The Debian packages: built with the ordinary tools, installed with apt on a node that has only
Debian's packages, enrolled by a piagent.conf on its boot partition, and purged without a trace.

The build (scripts/build-debs, a few seconds) runs once per session. The lab test borrows the
shared lab's last node: it takes the lab's source-tree agent out of the way (unit, drop-in, state
and boot config moved aside), installs the .deb with `apt-get install ./piagent_*.deb` as a person
would, and puts everything back afterwards, so the node is the lab's again for later tests.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lab_harness import Lab, describe

REPO = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("dpkg-buildpackage", "dpkg-checkbuilddeps", "dh", "pybuild")
# What the packages may depend on: bookworm's own packages (no pip on a Pi), and each other.
BOOKWORM_DEPENDS = {"python3:any", "python3-zmq", "python3-msgpack", "python3-cryptography", "python3-systemd",
                    "python3-yaml", "python3-jinja2", "python3-rich", "python3-prometheus-client",
                    "piagent"}
DEB_NODE_ID = "deb-agent"   # the packaged agent's id: the node's own (lab) agent keeps its key
ASIDE = "/root/lab-agent"   # where the lab's own agent waits while the package is tried


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> dict[str, Path]:
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool, path="/usr/bin:/bin") is None]
    if missing:
        message = (f"cannot build the .debs, missing {', '.join(missing)}: apt-get install debhelper dh-python "
                   f"pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel")
        if os.environ.get("PIMASTER_REQUIRE_BOOKWORM"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("debs")
    result = subprocess.run([str(REPO / "scripts" / "build-debs"), str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, describe(result)
    found = {p.name.split("_")[0]: p for p in out.glob("*.deb")}
    assert sorted(found) == ["piagent", "pimaster"], sorted(found)
    return found


def deb_field(deb: Path, field: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True).stdout.strip()


def deb_files(deb: Path) -> set[str]:
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1].lstrip(".").rstrip("/") for line in listing.splitlines()}  # "./usr/", "./usr/bin/x"


def modules(package_dir: str, import_name: str) -> set[str]:
    """Where each .py of a source folder lands in the package, e.g. agent/states/base.py ->
    /usr/lib/python3/dist-packages/piagent/states/base.py."""
    top = REPO / package_dir
    return {f"/usr/lib/python3/dist-packages/{import_name}/{p.relative_to(top)}"
            for p in top.rglob("*.py") if "__pycache__" not in p.parts}


def test_packages_hold_all_the_code_and_depend_only_on_bookworm(debs):
    agent_files, master_files = deb_files(debs["piagent"]), deb_files(debs["pimaster"])
    missing = (modules("agent", "piagent") - agent_files) | (modules("master", "pimaster") - master_files)
    # (a subpackage must be listed in pyproject.toml's `packages`, or the wheel leaves it out)
    assert not missing, f"modules of the source tree missing from the .debs: {sorted(missing)}"
    assert "/usr/bin/piagent" in agent_files and "/usr/bin/pimaster" in master_files
    assert "/lib/systemd/system/piagent.service" in agent_files
    assert "/lib/systemd/system/pimaster.service" in master_files
    assert not any("/pimaster/" in f for f in agent_files), "the agent package carries master code"
    assert "/usr/share/pimaster/states" in master_files
    assert "/usr/share/pimaster/dashboards/pimaster.json" in master_files  # the Grafana dashboard
    for name, deb in debs.items():
        assert deb_field(deb, "Architecture") == "all"
        depends = {d.split()[0] for d in deb_field(deb, "Depends").split(", ")}
        assert depends <= BOOKWORM_DEPENDS, f"{name} depends on {sorted(depends - BOOKWORM_DEPENDS)}"
    # The agent needs no YAML, templates, terminal tables or crypto library: a Pi Zero stays lean.
    assert {d.split()[0] for d in deb_field(debs["piagent"], "Depends").split(", ")} == {
        "python3:any", "python3-zmq", "python3-msgpack", "python3-systemd"}


# ---------------------------------------------------------------------------------------------
def sh(lab: Lab, node: str, script: str, **kwargs) -> subprocess.CompletedProcess:
    return lab.exec(node, "sh", "-ec", script, **kwargs)


def set_lab_agent_aside(lab: Lab, node: str) -> None:
    lab.exec(node, "systemctl", "disable", "--now", "piagent")
    sh(lab, node, f"mkdir -p {ASIDE} && mv /etc/systemd/system/piagent.service /etc/systemd/system/piagent.service.d "
                  f"/var/lib/piagent /boot/firmware/piagent.conf {ASIDE}/ && systemctl daemon-reload")


def restore_lab_agent(lab: Lab, node: str) -> None:
    if lab.exec(node, "dpkg-query", "-W", "-f=${Status}", "piagent", check=False).stdout.startswith("install"):
        lab.exec(node, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "piagent", timeout=300)
    sh(lab, node, f"rm -rf /var/lib/piagent /etc/piagent && "
                  f"mv {ASIDE}/piagent.service {ASIDE}/piagent.service.d /etc/systemd/system/ && "
                  f"mv {ASIDE}/piagent /var/lib/piagent && mv {ASIDE}/piagent.conf /boot/firmware/ && "
                  f"rmdir {ASIDE} && systemctl daemon-reload && systemctl enable --now piagent")
    lab.pimaster("keys", "delete", DEB_NODE_ID, check=False)
    Lab.wait_for(lambda: lab.ping() == {n: True for n in lab.nodes}, f"{node}'s lab agent back, every node up")


@pytest.mark.lab
def test_apt_installed_agent_enrolls_from_the_boot_partition_and_purge_leaves_no_unit(lab: Lab, debs):
    node = lab.nodes[-1]
    deb = debs["piagent"]
    token = json.loads(lab.pimaster("token", "create", "--address", f"{lab.ip('node01')}:4510", "--uses", "1",
                                    "--ttl", "15m", "--json").stdout)
    set_lab_agent_aside(lab, node)
    try:
        # A freshly flashed card: piagent.conf next to where the `ssh` file goes.
        sh(lab, node, "cat > /boot/firmware/piagent.conf", input=token["config"] + f"id = {DEB_NODE_ID}\n")
        sh(lab, node, f"base64 -d > /tmp/{deb.name}", input=base64.b64encode(deb.read_bytes()).decode())
        install = lab.exec(node, "sh", "-c", "cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
                                             "./piagent_*.deb", timeout=300)
        assert "Setting up piagent" in install.stdout, describe(install)

        assert lab.exec(node, "systemctl", "is-enabled", "piagent").stdout.strip() == "enabled"
        active = lab.exec(node, "systemctl", "is-active", "piagent", check=False).stdout.strip()
        assert active == "active", lab.exec(node, "journalctl", "-u", "piagent", "--no-pager", "-n", "40").stdout
        unit = lab.exec(node, "systemctl", "show", "-p", "FragmentPath", "-p", "ExecStart", "piagent").stdout
        assert "FragmentPath=/lib/systemd/system/piagent.service" in unit or \
               "FragmentPath=/usr/lib/systemd/system/piagent.service" in unit, unit
        assert "path=/usr/bin/piagent" in unit and "--config" not in unit, unit
        # The packaged code runs, on Debian's python3, not the source tree the lab binds in.
        pid = lab.exec(node, "systemctl", "show", "-p", "MainPID", "--value", "piagent").stdout.strip()
        cmdline = lab.exec(node, "cat", f"/proc/{pid}/cmdline").stdout.split("\0")
        assert cmdline[:3] == ["/usr/bin/python3", "/usr/bin/piagent", "run"], cmdline

        Lab.wait_for(lambda: lab.ping().get(DEB_NODE_ID), f"{DEB_NODE_ID} ({node}) to enroll and answer ping")
        keys = {k["id"]: k["state"] for k in json.loads(lab.pimaster("keys", "list", "--json").stdout)["keys"]}
        assert keys[DEB_NODE_ID] == "accepted"

        def boot_conf() -> str:
            return lab.exec(node, "cat", "/boot/firmware/piagent.conf").stdout

        Lab.wait_for(lambda: token["token"] not in boot_conf(), "the token gone from /boot/firmware", timeout=30)
        assert f"master = {token['address']}" in boot_conf() and token["fingerprint"] in boot_conf()
        etc = lab.exec(node, "cat", "/etc/piagent/piagent.conf").stdout
        assert token["token"] not in etc and f"id = {DEB_NODE_ID}" in etc
        assert lab.exec(node, "stat", "-c", "%a", "/etc/piagent/piagent.conf").stdout.strip() == "600"
        journal = lab.exec(node, "journalctl", "-u", "piagent", "--no-pager", "-o", "cat").stdout
        assert "took the settings of /boot/firmware/piagent.conf" in journal and "enrolled" in journal, journal

        purge = lab.exec(node, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "piagent",
                         timeout=300)
        assert lab.exec(node, "systemctl", "cat", "piagent", check=False).returncode != 0, describe(purge)
        for path in ("/lib/systemd/system/piagent.service", "/usr/lib/systemd/system/piagent.service",
                     "/etc/systemd/system/multi-user.target.wants/piagent.service", "/var/lib/piagent",
                     "/etc/piagent", "/usr/bin/piagent"):
            assert lab.exec(node, "test", "-e", path, check=False).returncode != 0, f"{path} left after purge"
        assert lab.exec(node, "systemctl", "is-active", "piagent", check=False).stdout.strip() != "active"
        # The card's file is the owner's: purge leaves it (without its token).
        assert "master =" in boot_conf()
    finally:
        restore_lab_agent(lab, node)
