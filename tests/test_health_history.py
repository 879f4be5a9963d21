"""The health history, `pimaster health`, `pimaster top --once` and the Prometheus metrics, with a
real master (health every fraction of a second: PIMASTER_TEST_HEALTH_INTERVAL) and real agents.

The month-long test feeds a simulated month of samples to the history itself (a compressed
clock: `HealthLog.record`/`compact` take the time) and checks its size and resolutions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from harness import REPO, Master, wait_for

INTERVAL = "0.3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def watched(tmp, processes, start_agent, monkeypatch):
    """A master taking health every INTERVAL seconds, with its metrics on 127.0.0.1, and two agents
    whose `vcgencmd` is a stand-in (this machine is no Pi) answering get_throttled with the word in
    the file ``master.throttled[node]``."""
    monkeypatch.setenv("PIMASTER_TEST_HEALTH_INTERVAL", INTERVAL)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "vcgencmd"
    stand_in.write_text('#!/bin/sh\nprintf "throttled=%s\\n" "$(cat "$PIMASTER_TEST_THROTTLED_FILE")"\n')
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    port = free_port()
    master = Master(tmp)
    master.argv += ["--metrics", f"127.0.0.1:{port}"]
    master.start()
    processes.append(master)
    master.metrics_url = f"http://127.0.0.1:{port}/metrics"
    config = master.token_config()
    master.throttled = {}
    for node in ("n1", "n2"):
        master.throttled[node] = tmp / f"throttled-{node}"
        master.throttled[node].write_text("0x0")
        monkeypatch.setenv("PIMASTER_TEST_THROTTLED_FILE", str(master.throttled[node]))
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, 30, what="both agents up")
    return master


def history(master: Master, node: str) -> dict:
    return master.json("health", node)


def test_health_history_is_recorded_from_real_agents_and_shown(watched):
    data = wait_for(lambda: (h := history(watched, "n1")) and sum(s["up"] for s in h["samples"]) >= 2 and h,
                    30, what="two samples of n1")
    assert data["node"] == "n1"
    sample = [s for s in data["samples"] if s["up"]][-1]
    assert sample["resolution"] == "raw" and sample["samples"] == 1
    # What ping shows, kept: the rtt, the load, the root disk, the memory, the clock offset.
    for field in ("rtt_ms", "load1", "disk_root_used_pct", "memory_used_pct", "clock_offset_ms"):
        assert isinstance(sample[field], (int, float)), (field, sample)
    times = [s["time"] for s in data["samples"]]
    assert times == sorted(times)  # newest last
    text = watched.cli("health", "n1").stdout
    assert "raw" in text and "n1" in text

    refused = watched.cli("health", "nosuchnode", check=False)
    assert refused.returncode == 2 and "no accepted node nosuchnode" in refused.stderr
    as_json = watched.cli("health", "nosuchnode", "--json", check=False)
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["code"] == "refused"


def test_a_node_that_stops_answering_gets_down_samples_and_an_event(watched, processes):
    agent = next(p for p in processes if getattr(p, "node_id", None) == "n2")
    wait_for(lambda: any(s["up"] for s in history(watched, "n2")["samples"]), 30, what="n2 sampled up")
    agent.stop()
    data = wait_for(lambda: (h := history(watched, "n2")) and h["samples"][-1]["up"] is False and h,
                    30, what="a down sample of n2")
    assert any(e["state"] == "not_answering" for e in data["events"]), data["events"]
    top = watched.cli("top", "--once").stdout
    lines = [line for line in top.splitlines() if line.startswith(("n1", "n2"))]
    assert lines[0].split()[:2] == ["n2", "down"], top  # nodes down at the top
    assert lines[1].split()[:2] == ["n1", "up"], top


def test_top_once_shows_every_node(watched):
    wait_for(lambda: all(history(watched, n)["samples"] for n in ("n1", "n2")), 30, what="samples of both")
    out = watched.cli("top", "--once")
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[2:] if line.strip()}
    assert set(rows) == {"n1", "n2"}, out.stdout
    assert all(" up " in row for row in rows.values()), out.stdout
    assert "NODE" in out.stdout.splitlines()[1]


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain")
        return answer.read().decode()


def test_metrics_are_scraped_over_http_on_loopback(watched):
    def scraped():
        text = _scrape(watched.metrics_url)
        return text if 'pimaster_node_rtt_seconds{node="n1"}' in text else None
    text = wait_for(scraped, 30, what="n1's series")
    assert 'pimaster_node_up{node="n1"} 1.0' in text
    assert 'pimaster_node_up{node="n2"} 1.0' in text
    assert "pimaster_connected_agents 2.0" in text
    assert "pimaster_pending_keys 0.0" in text
    assert 'pimaster_node_load1{node="n1"}' in text
    assert "pimaster_dropped_messages_total" in text
    # The shipped Grafana dashboard reads only series the master exports.
    import re

    dashboard = json.loads((REPO / "master" / "dashboards" / "pimaster.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = set(re.findall(r"pimaster_[a-z0-9_]+", " ".join(exprs)))
    assert "pimaster_node_temperature_celsius" in used and "pimaster_node_throttled" in used
    exported = set(re.findall(r"^# TYPE (pimaster_[a-z0-9_]+)", text, re.M))
    exported |= {name + "_total" for name in exported}
    assert used <= exported, used - exported
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(watched.metrics_url.replace("/metrics", "/elsewhere"), timeout=10)
    assert missing.value.code == 404


def test_a_bad_metrics_address_is_a_usage_error(tmp):
    master = Master(tmp)
    for bad in ("9466", "example.org:9466", "127.0.0.1:99999", "127.0.0.1:"):
        result = subprocess.run(master.argv + ["--metrics", bad], capture_output=True, text=True, env=master.env,
                                timeout=60)
        assert result.returncode == 2, (bad, result.stderr)
        assert "--metrics" in result.stderr
    assert not (tmp / "master" / "control.sock").exists()


def test_a_simulated_month_stays_within_the_stated_size_and_keeps_each_resolution(tmp):
    """A compressed clock: a month of 30-second samples of two nodes (random values, which pack
    worst) fed to the history, compacted as the master does; a fourth node's key is deleted."""
    import random

    from pimaster.healthlog import (HISTORY_BYTES_PER_NODE, MINUTE_ROWS_MAX, QUARTER_ROWS_MAX, RAW_ROWS_MAX,
                                    HealthLog)

    log = HealthLog(str(tmp / "health.db"))
    assert (os.stat(tmp / "health.db").st_mode & 0o777) == 0o600
    nodes, deleted = ["node01", "a-rather-long-node-id-" + "x" * 40], "node04"
    rnd = random.Random(16)
    start = now = 1_800_000_000.0
    month = 31 * 86400
    while now < start + month:
        batch = []
        for step in range(120):  # an hour of rounds, then a compaction (the master: every minute)
            when = now + step * 30
            for node in nodes + ([deleted] if when < start + 86400 else []):
                sample = {"node": node, "time": when, "up": rnd.random() > 0.05}
                if sample["up"]:
                    sample.update(rtt_ms=rnd.uniform(0.3, 40), load1=rnd.uniform(0, 4), temp_c=rnd.uniform(35, 85),
                                  clock_offset_ms=rnd.uniform(-80, 80), memory_used_pct=rnd.uniform(5, 95),
                                  memory_available_mb=rnd.randint(50, 7800), disk_root_used_pct=rnd.uniform(5, 95),
                                  disk_root_free_mb=rnd.randint(100, 60000), throttled=rnd.choice([0, 0, 0, 0x50005]))
                batch.append(sample)
        log.record(batch)
        now += 120 * 30
        log.compact(now, set(nodes))
    log.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    counts = log.counts()
    assert set(counts) == set(nodes)  # the deleted node's rows went with its key
    for node in nodes:
        assert 0 < counts[node]["raw"] <= RAW_ROWS_MAX
        assert 0 < counts[node]["1m"] <= MINUTE_ROWS_MAX
        assert 0 < counts[node]["15m"] <= QUARTER_ROWS_MAX
    size = os.path.getsize(tmp / "health.db") + (os.path.getsize(tmp / "health.db-wal")
                                                  if (tmp / "health.db-wal").exists() else 0)
    assert size <= len(nodes) * HISTORY_BYTES_PER_NODE, size

    rows, truncated = log.history("node01", now - 31 * 86400)
    assert not truncated
    by_resolution = {}
    for row in rows:
        by_resolution.setdefault(row["resolution"], []).append(row["time"])
    # Newest last, each resolution over its own span: raw the last hour, 1m the day, 15m the month.
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)
    assert min(by_resolution["raw"]) >= now - 3600 - 60
    assert now - 86400 - 900 <= min(by_resolution["1m"]) and max(by_resolution["1m"]) < min(by_resolution["raw"])
    assert now - 30 * 86400 <= min(by_resolution["15m"]) <= now - 29 * 86400
    assert max(by_resolution["15m"]) < min(by_resolution["1m"])
    quarter = next(r for r in rows if r["resolution"] == "15m")
    assert quarter["samples"] == 30 and 0 < quarter["answered"] <= 30
    assert quarter["temp_c_max"] >= quarter["temp_c"]
    # Flags OR'ed: a quarter with one under-voltage sample still says so.
    assert any("under-voltage" in (r.get("throttled_flags") or []) for r in rows if r["resolution"] == "15m")
    log.close()


def test_throttling_and_under_voltage_from_a_vcgencmd_stand_in_become_events_top_and_metrics(watched):
    wait_for(lambda: any(s.get("throttled") == "0x0" for s in history(watched, "n2")["samples"]), 30,
             what="n2's throttled word")
    watched.throttled["n2"].write_text("0x50005")  # under-voltage and throttled, now and since boot
    data = wait_for(lambda: (h := history(watched, "n2")) and {"throttling_began", "under_voltage_began"}
                    <= {e["state"] for e in h["events"]} and h, 30, what="n2's health events")
    began = next(e for e in data["events"] if e["state"] == "under_voltage_began")
    assert began["throttled"] == "0x50005"
    assert began["flags"] == ["under-voltage", "throttled", "under-voltage-occurred", "throttled-occurred"]
    assert data["samples"][-1]["throttled_flags"] == began["flags"]
    assert not any(e["state"].endswith("_began") for e in history(watched, "n1")["events"])

    top = watched.cli("top", "--once").stdout
    row = next(line for line in top.splitlines() if line.startswith("n2 "))
    assert "under-voltage,throttled" in row, top
    assert "1 throttling or under-voltage" in top

    text = _scrape(watched.metrics_url)
    assert 'pimaster_node_throttled{flag="under-voltage",node="n2"} 1.0' in text
    assert 'pimaster_node_throttled{flag="arm-frequency-capped",node="n2"} 0.0' in text
    assert 'pimaster_node_throttled{flag="under-voltage",node="n1"} 0.0' in text

    watched.throttled["n2"].write_text("0x50000")  # the sticky bits stay, the current ones go
    data = wait_for(lambda: (h := history(watched, "n2")) and "under_voltage_ended" in {e["state"] for e in h["events"]}
                    and h, 30, what="the under-voltage's end")
    assert "throttling_ended" in {e["state"] for e in data["events"]}


def test_a_real_prometheus_scrapes_the_master_and_answers_promql_for_a_node(watched, tmp, processes):
    """Debian's `prometheus` (scripts/setup installs it; no service of its own), started here on
    127.0.0.1 with its own config and storage, scraping the master's --metrics."""
    import shutil

    from harness import Process

    binary = shutil.which("prometheus", path="/usr/bin:/bin:/usr/sbin")
    if binary is None:
        message = "Debian's prometheus is missing: scripts/setup installs it"
        if os.environ.get("PIMASTER_REQUIRE_BOOKWORM"):
            pytest.fail(message)
        pytest.skip(message)
    watched.throttled["n2"].write_text("0x50005")
    target = watched.metrics_url.split("//", 1)[1].split("/", 1)[0]
    config = tmp / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      "scrape_configs:\n  - job_name: pimaster\n    static_configs:\n"
                      f"      - targets: ['{target}']\n")
    port = free_port()
    prometheus = Process([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                          f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                         tmp / "prometheus.log", dict(os.environ)).start()
    processes.append(prometheus)

    def query(promql: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                data = json.load(answer)
        except (OSError, ValueError):
            assert prometheus.alive(), prometheus.output()
            return []
        assert data["status"] == "success", data
        return data["data"]["result"]

    flag = wait_for(lambda: query('pimaster_node_throttled{node="n2", flag="under-voltage"} == 1'), 60,
                    what="n2's under-voltage flag through PromQL")
    assert flag[0]["metric"]["job"] == "pimaster" and flag[0]["value"][1] == "1"
    up = wait_for(lambda: query("sum(pimaster_node_up)"), 30, what="the nodes up")
    assert up[0]["value"][1] == "2"
    load = query('pimaster_node_load1{node="n1"}')
    assert load and float(load[0]["value"][1]) >= 0
    assert not query('pimaster_node_throttled{node="n1", flag="under-voltage"} == 1')


def test_top_live_sorts_by_key_quits_on_q_and_gives_the_terminal_back(watched):
    """`top` on a terminal (a pseudo-terminal here): the live view, `l` sorts by load, `q` quits,
    and the terminal's modes are as they were (no cbreak, echo back on)."""
    import pty
    import select
    import termios

    wait_for(lambda: all(history(watched, n)["samples"] for n in ("n1", "n2")), 30, what="samples of both")
    ours, theirs = pty.openpty()
    modes = termios.tcgetattr(theirs)
    top = subprocess.Popen([watched.python, "-m", "pimaster", "top", "--refresh", "0.5",
                            "--state-dir", str(watched.state_dir)], stdin=theirs, stdout=theirs, stderr=theirs,
                           env=dict(watched.env, TERM="xterm", COLUMNS="170", LINES="20"))
    seen = bytearray()

    def shown(text: str) -> bool:
        while select.select([ours], [], [], 0.1)[0]:
            try:
                seen.extend(os.read(ours, 65536))
            except OSError:
                break
        return text.encode() in seen

    try:
        wait_for(lambda: shown("sorted by name"), 30, what="the live view")
        assert b"n1" in seen and b"n2" in seen
        os.write(ours, b"l")
        wait_for(lambda: shown("sorted by load"), 30, what="the view sorted by load")
        os.write(ours, b"q")
        assert top.wait(30) == 0
    finally:
        if top.poll() is None:
            top.kill()
    assert termios.tcgetattr(theirs) == modes
    os.close(ours)
    os.close(theirs)
