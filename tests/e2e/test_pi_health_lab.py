"""Watching the cluster on the lab: a Pi running hot on a weak power supply (`pimaster lab set`) shows
in `pimaster top --once`, its health events and history are recorded (`pimaster health`), and a real
Prometheus server, started in node01 on its own loopback (never reachable from outside the lab),
scrapes the master's `--metrics 127.0.0.1:9466` and answers PromQL for node03's temperature and
under-voltage flag.

The lab's master records health every `health_interval`, set to 2 s in its cluster.yaml here (the
default is 30 s), as a person would set it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from lab_harness import Lab
from pimaster import lab as labmod

pytestmark = pytest.mark.lab

MASTER = "node01"
NODE = "node03"
PROMETHEUS_PORT = 9090
PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pimaster
    static_configs:
      - targets: ['127.0.0.1:9466']
"""
# PromQL through Prometheus' HTTP API, from inside node01 (the API listens on its loopback only).
QUERY = """\
import json, sys, urllib.parse, urllib.request
url = "http://127.0.0.1:%d/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[1]})
try:
    with urllib.request.urlopen(url, timeout=5) as answer:
        print(json.dumps(json.load(answer)["data"]["result"]))
except OSError:
    print("[]")
""" % PROMETHEUS_PORT


def promql(lab: Lab, query: str) -> list:
    return json.loads(lab.exec(MASTER, "python3", "-c", QUERY, query).stdout)


def health(lab: Lab, node: str) -> dict:
    return json.loads(lab.pimaster("health", node, "--since", "10m", "--json").stdout)


def test_a_hot_under_powered_pi_shows_in_top_its_health_history_and_prometheus(lab, cluster_yaml):
    if shutil.which("prometheus", path="/usr/bin") is None:
        pytest.fail("Debian's prometheus is missing: scripts/setup installs it")
    before = labmod.pi_status(lab.state.node(NODE))
    cluster_yaml(health_interval="2s")
    lab.write_file(MASTER, "/root/prometheus.yml", PROMETHEUS_CONFIG)
    prometheus = lab.spawn(MASTER, "prometheus", "--config.file=/root/prometheus.yml",
                           "--storage.tsdb.path=/root/prometheus-data", "--log.level=warn",
                           f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}")
    try:
        lab.set(NODE, temp="82", throttled="0x50005")

        # The transition is an event, kept with the node's history.
        def under_voltage_event():
            events = [e for e in health(lab, NODE)["events"] if e.get("state") == "under_voltage_began"]
            return events[-1] if events else None
        event = Lab.wait_for(under_voltage_event, "node03's under-voltage event", timeout=90, interval=1)
        assert event["throttled"] == "0x50005" and "under-voltage" in event["flags"], event
        samples = health(lab, NODE)["samples"]
        hot = [s for s in samples if s.get("temp_c") == 82.0]
        assert hot and "under-voltage" in hot[-1]["throttled_flags"], samples[-3:]
        assert samples[-1]["resolution"] == "raw"

        # top --once: node03 hot and under-voltage, the others not.
        frame = lab.pimaster("top", "--once").stdout
        row = next(line for line in frame.splitlines() if line.startswith(NODE))
        assert "82.0°C" in row and "under-voltage" in row, frame
        assert "under-voltage" not in next(line for line in frame.splitlines() if line.startswith("node02"))

        # A real Prometheus scraped the master: PromQL answers node03's temperature and flag.
        temperature = Lab.wait_for(lambda: promql(lab, f'pimaster_node_temperature_celsius{{node="{NODE}"}} == 82'),
                                   "Prometheus to have node03's temperature", timeout=90, interval=1)
        assert temperature[0]["metric"]["job"] == "pimaster"
        flag = Lab.wait_for(lambda: promql(lab, f'pimaster_node_throttled{{node="{NODE}",flag="under-voltage"}} == 1'),
                            "Prometheus to have node03's under-voltage flag", timeout=30, interval=1)
        assert flag[0]["value"][1] == "1"
        assert not promql(lab, 'pimaster_node_throttled{node="node02",flag="under-voltage"} == 1')
    finally:
        lab.set(NODE, temp=str(before.get("temp_c", 47.0)), throttled=before.get("throttled", "0x0"))
        Lab.reap(prometheus)
        lab.exec(MASTER, "rm", "-rf", "/root/prometheus-data", "/root/prometheus.yml", check=False)
