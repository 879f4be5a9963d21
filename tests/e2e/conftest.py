"""The end-to-end tier: a simulated Pi cluster (`pimaster lab`) shared by every e2e test.

One lab per test session (a bring-up takes seconds, but a lab per test would add up), always torn
down at the end, failures included. Tests take the `lab` fixture (a lab_harness.Lab):

    def test_something(lab):
        lab.exec("node02", "systemctl", "is-active", "piagent")      # CompletedProcess, checked
        lab.pimaster("ping", "--json")                               # the master's CLI in node01
        lab.nodes, lab.ip("node03"), lab.master_state_dir

A test that takes the lab down (`lab.down()`) leaves it to the next `lab` user to bring it up again.

The lab's master runs with a cluster directory of its own (`lab up --cluster-dir`): a copy of the
shipped states with `auto_apply: false`, so that enrollments do not converge the lab by themselves
and each test applies what it tests. `cluster_yaml` (the fixture) edits that copy; the master reads
it again for every run, so a test turns zero touch or drift checks on and off without a restart.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

from lab_harness import Lab, describe, lab_unavailable
from pimaster import lab as labmod


# One machine holds one lab: test sessions that need it (several developers' runs, CI) take turns.
SESSION_LOCK = "/run/lock/pimaster-e2e-session.lock"
# The lab master's cluster directory: outside the lab's own directory (`lab down` deletes that).
CLUSTER_DIR = Path("/var/lib/pimaster-e2e-cluster")
SHIPPED_STATES = Path(__file__).resolve().parents[2] / "states"


def write_cluster_dir(**settings) -> None:
    """The copy of the shipped states, its cluster.yaml with these top-level ``settings`` (YAML
    text values, e.g. auto_apply="true") in place of the shipped ones."""
    import re

    if not CLUSTER_DIR.is_dir():
        shutil.copytree(SHIPPED_STATES, CLUSTER_DIR)
    text = (SHIPPED_STATES / "cluster.yaml").read_text()
    settings = {"auto_apply": "false", **settings}
    for key, value in settings.items():
        text = re.sub(rf"^#? ?{key}:.*$\n?", "", text, flags=re.M)
    head = "".join(f"{key}: {value}\n" for key, value in settings.items() if value is not None)
    tmp = CLUSTER_DIR / "cluster.yaml.tmp"
    tmp.write_text(head + text)
    os.replace(tmp, CLUSTER_DIR / "cluster.yaml")


@pytest.fixture(scope="session")
def lab_session():
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    lock_fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # waits for another session's lab to be torn down
    shutil.rmtree(CLUSTER_DIR, ignore_errors=True)
    write_cluster_dir()
    lab = Lab(cluster_dir=str(CLUSTER_DIR))
    try:
        yield lab
    finally:
        try:
            _teardown(lab)
        finally:
            shutil.rmtree(CLUSTER_DIR, ignore_errors=True)
            os.close(lock_fd)


def _teardown(lab) -> None:
    # Always tear down, also after failures; a leftover lab would break the next run.
    if lab.is_up or labmod.leftovers():
        result = lab.down()
        if result.returncode != 0:
            print(f"pimaster lab down failed: {describe(result)}", file=sys.stderr)


@pytest.fixture
def lab(lab_session) -> Lab:
    """The shared lab, up (brought up again if an earlier test took it down)."""
    return lab_session.ensure_up()


@pytest.fixture
def cluster_yaml():
    """``cluster_yaml(auto_apply="true", check_interval="10s")``: the lab master's cluster.yaml with
    these settings; back to the session's (auto_apply false, no drift checks) after the test."""
    yield write_cluster_dir
    write_cluster_dir()
