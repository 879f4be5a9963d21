"""Soak: `pimaster ping` every second, for ten minutes, over the lab's nodes plus 500 swarm agents.

The swarm (bench/swarm.py: real agent code, one CURVE session per agent, idle) runs as a transient
systemd unit INSIDE a lab node, so that all its traffic stays in the lab's namespaces; it enrolls
with a join token from the lab's master. Counted: answers expected against answers received, per
ping and in total (target: none missed), and the master's resident memory at the start and at the
end (no growth beyond noise).

PIMASTER_SOAK_S sets the duration (default 600 s, what CI runs; 60 is enough while developing),
PIMASTER_SOAK_SWARM the number of swarm agents (default 500).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest

from lab_harness import Lab
from pimaster import lab as labmod

pytestmark = [pytest.mark.lab, pytest.mark.soak]

SOAK_S = float(os.environ.get("PIMASTER_SOAK_S", "600"))
SWARM = int(os.environ.get("PIMASTER_SOAK_SWARM", "500"))
SWARM_NODE = "node02"
UNIT = "pimaster-soak-swarm"
PREFIX = "soak"
CONF = "/root/soak-swarm.conf"
STATE = "/root/soak-swarm"
PING_TIMEOUT_S = 5
RSS_SAMPLE_S = 30
# The master's memory, measured: libzmq queues each connection's messages in chunks of 256 (one
# chunk plus a spare per direction once a queue has cycled), so its RSS rises by ~55 kB per connected
# agent over the first ~500 messages to each, then stays flat (loopback: flat from ping 500 to 1300).
# At one ping a second that warm-up takes most of the ten minutes. A leak does not level off: the
# growth must stay within that per-connection bound, and the last third of the run must be flat.
PER_CONNECTION_KB = 64
RSS_NOISE_KB = 4 * 1024   # Python's allocator and SQLite's page cache move a few MB either way


def _ping(lab: Lab) -> tuple[dict[str, bool], float]:
    started = time.monotonic()
    result = lab.pimaster("ping", "--json", "--timeout", str(PING_TIMEOUT_S), check=False,
                          timeout=PING_TIMEOUT_S + 60)
    try:
        answers = {n["id"]: bool(n["ok"]) for n in json.loads(result.stdout)["nodes"]}
    except (ValueError, KeyError, TypeError):
        answers = {}
    return answers, time.monotonic() - started


def _master_rss_kb(lab: Lab) -> tuple[int, int]:
    pid = lab.main_pid(labmod.MASTER_NODE, "pimaster")
    return pid, lab.rss_kb(labmod.MASTER_NODE, pid)


def _node_memory_mb(lab: Lab, node: str) -> float:
    """PSS of every process of the node (its cgroup), as `pimaster lab status` counts it."""
    return labmod.node_memory_mb(lab.state.node(node))


def test_ping_every_second_over_the_lab_and_a_swarm_misses_nothing_and_memory_stays_flat(lab: Lab):
    token = json.loads(lab.pimaster("token", "create", "--uses", str(SWARM + 10), "--ttl", "2h",
                                    "--address", lab.state.master_address,
                                    "--json").stdout)
    lab.exec(SWARM_NODE, "sh", "-c", f'umask 077 && cat > {CONF}', input=token["config"])
    lab.exec(SWARM_NODE, "rm", "-rf", STATE)
    expected = set(lab.nodes) | {f"{PREFIX}-{i:04d}" for i in range(SWARM)}
    node_mb_before = _node_memory_mb(lab, SWARM_NODE)
    lab.exec(SWARM_NODE, "systemd-run", f"--unit={UNIT}", "--collect", "-p", "LimitNOFILE=65536",
             "--setenv=PYTHONDONTWRITEBYTECODE=1", "/usr/bin/python3", f"{labmod.NODE_SRC}/bench/swarm.py",
             "--config", CONF, "--count", str(SWARM), "--prefix", PREFIX, "--state-dir", STATE)
    try:
        enroll_started = time.monotonic()

        def all_answer() -> bool:
            answers, _ = _ping(lab)
            return expected <= {n for n, ok in answers.items() if ok}

        Lab.wait_for(all_answer, f"{SWARM} swarm agents in {SWARM_NODE} and the lab's nodes to answer ping",
                     timeout=600, interval=2)
        enroll_s = time.monotonic() - enroll_started
        master_pid, rss_start = _master_rss_kb(lab)
        swarm_pid = lab.main_pid(SWARM_NODE, UNIT)

        pings, missed_per_ping, durations, late = 0, [], [], 0
        never_answered: set[str] = set()
        rss_samples = [(0, rss_start)]
        started = time.monotonic()
        next_sample = RSS_SAMPLE_S
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= SOAK_S:
                break
            answers, took = _ping(lab)
            pings += 1
            durations.append(took)
            ok = {n for n, good in answers.items() if good}
            missing = expected - ok
            missed_per_ping.append(len(missing))
            if missing:
                never_answered |= missing
                print(f"ping {pings} at {elapsed:.0f} s: {len(missing)} missed, e.g. {sorted(missing)[:5]}",
                      flush=True)
            elapsed = time.monotonic() - started
            if elapsed >= next_sample:
                rss_samples.append((round(elapsed), _master_rss_kb(lab)[1]))
                next_sample += RSS_SAMPLE_S
            # One ping a second: the next starts on the next whole second of the run (at once if late).
            wait = (pings - (time.monotonic() - started))
            if wait > 0:
                time.sleep(wait)
            else:
                late += 1
        pid_end, rss_end = _master_rss_kb(lab)
        swarm_rss_kb = lab.rss_kb(SWARM_NODE, swarm_pid)
        node_mb = _node_memory_mb(lab, SWARM_NODE)
        master_restarted = pid_end != master_pid
        swarm_alive = lab.exec(SWARM_NODE, "systemctl", "is-active", UNIT, check=False).stdout.strip()
    finally:
        lab.exec(SWARM_NODE, "systemctl", "stop", UNIT, check=False, timeout=120)
        lab.exec(SWARM_NODE, "rm", "-rf", STATE, CONF, check=False)
        # The swarm's keys go, so that the lab is its four nodes again for whoever comes next.
        lab.pimaster("keys", "delete", "--yes", f"{PREFIX}-*", check=False)

    rss_samples.append((round(SOAK_S), rss_end))
    tail_from = min(rss_samples, key=lambda sample: abs(sample[0] - SOAK_S * 2 / 3))
    total_expected = pings * len(expected)
    figures = {
        "duration_s": SOAK_S, "nodes": len(lab.nodes), "swarm_agents": SWARM, "enroll_s": round(enroll_s, 1),
        "pings": pings, "late_pings": late, "answers_expected": total_expected,
        "answers_missed": sum(missed_per_ping), "pings_with_misses": sum(1 for m in missed_per_ping if m),
        "ping_s_median": round(statistics.median(durations), 2), "ping_s_max": round(max(durations), 2),
        "master_rss_mb_start": round(rss_start / 1024, 1), "master_rss_mb_end": round(rss_end / 1024, 1),
        "master_rss_kb_growth_per_agent": round((rss_end - rss_start) / len(expected), 1),
        "master_rss_mb_last_third": [tail_from[0], round((rss_end - tail_from[1]) / 1024, 1)],
        "master_rss_mb_samples": [(t, round(kb / 1024, 1)) for t, kb in rss_samples],
        "swarm_rss_mb": round(swarm_rss_kb / 1024, 1),
        f"{SWARM_NODE}_memory_mb_before_after": [node_mb_before, node_mb],
    }
    print(f"\nFIGURES soak: {json.dumps(figures)}", flush=True)
    assert not master_restarted, "the master restarted during the soak"
    assert swarm_alive == "active", f"the swarm stopped during the soak ({swarm_alive})"
    assert pings >= SOAK_S * 0.9 - 1, f"only {pings} pings in {SOAK_S:.0f} s"
    assert sum(missed_per_ping) == 0, f"missed answers from {sorted(never_answered)[:20]}"
    growth = rss_end - rss_start
    assert growth <= PER_CONNECTION_KB * len(expected) + RSS_NOISE_KB, \
        f"the master grew by {growth / 1024:.1f} MB in {SOAK_S:.0f} s ({rss_samples})"
    assert rss_end - tail_from[1] <= RSS_NOISE_KB, \
        f"the master still grew by {(rss_end - tail_from[1]) / 1024:.1f} MB from {tail_from[0]} s on ({rss_samples})"
