"""`pimaster lab up --arch` and `lab add --arch`: what a person may write, and what the lab refuses
before it builds or starts anything. (The ARM nodes themselves: tests/e2e/test_arm_lab.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pimaster.lab import arch
from pimaster.lab.model import LabRefused

NAMES = ["node01", "node02", "node03", "node04"]
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, expected", [
    ("arm64", {"node02": "arm64", "node03": "arm64", "node04": "arm64"}),
    ("ARMHF", {"node02": "armhf", "node03": "armhf", "node04": "armhf"}),
    ("node02=arm64,node03=armhf", {"node02": "arm64", "node03": "armhf"}),
    (" node03 = armhf , node02=arm64 ", {"node02": "arm64", "node03": "armhf"}),
])
def test_arch_option_names_the_arm_nodes(text, expected):
    native = arch.native_arch()
    text = text.replace("native_placeholder", native)  # naming the host's own keeps a node native
    assert arch.parse_arch_option(text, NAMES) == expected


def test_a_lab_of_node01_alone_has_no_node_to_make_arm():
    with pytest.raises(LabRefused) as caught:
        arch.parse_arch_option("arm64", ["node01"])
    assert "give --nodes 2 or more" in str(caught.value)


def test_this_machines_own_architecture_means_native_nodes():
    assert arch.parse_arch_option(arch.native_arch(), NAMES) == {}
    assert arch.parse_arch_option(f"node01={arch.native_arch()}", NAMES) == {}


@pytest.mark.parametrize("text, fragment", [
    ("node01=arm64", "node01 runs the master from this source tree"),
    ("node09=arm64", "the lab has no node 'node09'"),
    ("sparc", "'sparc' is not an architecture the lab has; it has arm64, armhf"),
    ("node02=i386x", "'i386x' is not an architecture"),
    ("arm64,armhf", "give one architecture for every node, or NODE=ARCH pairs"),
    (" , ", "--arch needs an architecture"),
    ("node02=arm64,node02=armhf", "node02 is named twice"),
])
def test_arch_option_refuses_what_it_cannot_build(text, fragment):
    with pytest.raises(LabRefused) as caught:
        arch.parse_arch_option(text, NAMES)
    assert fragment in str(caught.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="`pimaster lab` needs root before it reads its options")
@pytest.mark.parametrize("args, fragment", [
    (["up", "--nodes", "3", "--arch", "node01=arm64"], "node01 runs the master"),
    (["up", "--nodes", "3", "--arch", "node04=arm64"], "no node 'node04'"),
    (["up", "--arch", "riscv64"], "not an architecture the lab has"),
])
def test_lab_up_refuses_a_bad_arch_before_making_anything(args, fragment):
    before = sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []
    env = dict(os.environ, PYTHONPATH=str(REPO.parent / REPO.name))
    result = subprocess.run([sys.executable, "-m", "pimaster", "lab", *args], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr
    assert (sorted(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else []) == before


def test_a_changed_agent_source_means_a_new_deb_for_arm_nodes(tmp_path):
    """The roots hold the agent of the source they were given; an edit to the agent (not to the
    master) makes the next `up --arch` build and install its .deb again."""
    for rel in ("agent", "debian", "master"):
        shutil.copytree(REPO / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    first = arch.agent_source_hash(tmp_path)
    (tmp_path / "master" / "cli.py").write_text("# the master changed, not the agent\n")
    assert arch.agent_source_hash(tmp_path) == first
    with open(tmp_path / "agent" / "facts.py", "a") as fh:
        fh.write("\n# a change to the agent\n")
    assert arch.agent_source_hash(tmp_path) != first


def test_apt_config_for_an_arm_root_reads_nothing_of_the_hosts(tmp_path, monkeypatch):
    """The private APT configuration points at the root's own sources, lists, cache and dpkg status:
    fetching packages for ARM nodes never changes the host's apt or dpkg state."""
    monkeypatch.setattr(arch, "APT_DIR", tmp_path / "apt")
    root = tmp_path / "roots" / "arm64"
    conf = arch.apt_config("arm64", root).read_text()
    assert 'APT::Architecture "arm64";' in conf
    paths = [line.split('"')[1] for line in conf.splitlines() if line.startswith("Dir::")]
    assert paths and all(p.startswith(str(tmp_path)) for p in paths), paths
    env = dict(os.environ, APT_CONFIG=str(tmp_path / "apt" / "arm64" / "apt.conf"))
    shown = subprocess.run(["apt-config", "dump"], capture_output=True, text=True, env=env).stdout
    assert f'Dir::State::status "{root}/var/lib/dpkg/status";' in shown
    assert 'APT::Architecture "arm64";' in shown
