"""The end-to-end tier: a simulated Pi cluster (`pimaster lab`) shared by every e2e test.

One lab per test session (a bring-up takes seconds, but a lab per test would add up), always torn
down at the end, failures included. Tests take the `lab` fixture (a lab_harness.Lab):

    def test_something(lab):
        lab.exec("node02", "systemctl", "is-active", "piagent")      # CompletedProcess, checked
        lab.pimaster("ping", "--json")                               # the master's CLI in node01
        lab.nodes, lab.ip("node03"), lab.master_state_dir

A test that takes the lab down (`lab.down()`) leaves it to the next `lab` user to bring it up again.
"""

from __future__ import annotations

import fcntl
import os
import sys

import pytest

from lab_harness import Lab, describe, lab_unavailable
from pimaster import lab as labmod


# One machine holds one lab: test sessions that need it (several developers' runs, CI) take turns.
SESSION_LOCK = "/run/lock/pimaster-e2e-session.lock"


@pytest.fixture(scope="session")
def lab_session():
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)
    lock_fd = os.open(SESSION_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)  # waits for another session's lab to be torn down
    lab = Lab()
    try:
        yield lab
    finally:
        try:
            _teardown(lab)
        finally:
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
