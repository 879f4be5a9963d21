"""`pimaster serve --metrics HOST:PORT`: the cluster in Prometheus' text format, one scrape target
for every node (`prometheus_client`'s exposition; Debian's python3-prometheus-client).

Values are read when Prometheus scrapes (a custom collector), from each node's latest health
sample (`healthwatch.HealthWatch.latest`) and the master's own counts. The HTTP server is a
small one on the master's asyncio loop, so that the collector reads the master's state on the
thread that changes it: GET (or HEAD) of `/metrics` (or `/`), anything else 404; at most
MAX_CLIENTS connections at once (MAX_CLIENTS_PER_ADDRESS from one address), a request line and
headers of at most REQUEST_LIMIT bytes read within HEADER_TIMEOUT_S, one text made per CACHE_S.
It listens only on the address the user gave (an IP address or `localhost`, and a port); there is no authentication: give an address only those who may read the
cluster's health can reach.

Series (the Grafana dashboard, dashboards/pimaster.json, uses them); per node, labelled
``node`` (an agent's id, valid by `NODE_ID_RE`; any other is left out, never written):

- ``pimaster_node_up``: 1 when it answered the last health round (before the first: connected);
- ``pimaster_node_temperature_celsius``, ``pimaster_node_load1``/``5``/``15``,
  ``pimaster_node_rtt_seconds``, ``pimaster_node_clock_offset_seconds``,
  ``pimaster_node_memory_used_ratio``, ``pimaster_node_memory_available_bytes``,
  ``pimaster_node_root_disk_used_ratio``, ``pimaster_node_root_disk_free_bytes``: from its latest
  answer (left out when it has none, or did not report that value);
- ``pimaster_node_throttled{flag=...}``: 1 or 0 per named bit of the firmware's throttled word
  (`healthlog.THROTTLE_BITS`, the names `ping` shows: under-voltage, arm-frequency-capped, throttled,
  soft-temperature-limit and the
  ``*_occurred`` ones, since its boot); only for nodes that report the word (Pis);
- ``pimaster_node_last_seen_timestamp_seconds``: when the master last heard from it;
- ``pimaster_node_health_timestamp_seconds``: when its latest health sample was taken.

The master's own: ``pimaster_connected_agents``, ``pimaster_accepted_nodes``,
``pimaster_pending_keys``, ``pimaster_dropped_messages_total``, ``pimaster_job_node_results{result}``
(node results of the jobs kept: ok, changed, failed, interrupted, no_answer, running),
``pimaster_health_history_bytes``, ``pimaster_health_rounds_total``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

from piagent.config import NODE_ID_RE

from .healthlog import THROTTLE_BITS

log = logging.getLogger("pimaster")

MAX_CLIENTS = 16
# Connections one address may hold at once: a peer holding every slot would keep Prometheus out.
MAX_CLIENTS_PER_ADDRESS = 4
REQUEST_LIMIT = 16 * 1024
# The request line and headers come at once from a scraper; the answer may take a slow reader longer.
HEADER_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 10.0
# Scrapes within this many seconds of each other get the same text: scraping costs the master's
# loop once a second at most, however often it is asked.
CACHE_S = 1.0
# The job results are counted from the store at most this often (a scrape every few seconds must
# not read every kept job each time).
JOB_COUNT_CACHE_S = 15.0

# name -> (help, sample field, factor)
NODE_GAUGES = {
    "pimaster_node_temperature_celsius": ("CPU temperature", "temp_c", 1),
    "pimaster_node_rtt_seconds": ("round trip of the last health request", "rtt_ms", 0.001),
    "pimaster_node_clock_offset_seconds": ("the node's clock minus the master's", "clock_offset_ms", 0.001),
    "pimaster_node_memory_used_ratio": ("memory not available to new programs, 0-1", "memory_used_pct", 0.01),
    "pimaster_node_memory_available_bytes": ("memory available to new programs", "memory_available_mb", 1 << 20),
    "pimaster_node_root_disk_used_ratio": ("root file system used, 0-1", "disk_root_used_pct", 0.01),
    "pimaster_node_root_disk_free_bytes": ("root file system free", "disk_root_free_mb", 1 << 20),
}


class MetricsAddressError(ValueError):
    pass


def parse_metrics_address(text: str) -> tuple[str, int]:
    """`--metrics`: `HOST:PORT` or `[V6]:PORT`, HOST an IP address or `localhost` (127.0.0.1): the
    one address it listens on, never a name that could resolve to others. Raises MetricsAddressError."""
    text = (text or "").strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text:
        raise MetricsAddressError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9466)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MetricsAddressError(f"bad port in {text!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise MetricsAddressError(f"{host!r} is not an IP address (or localhost): the metrics listen only "
                                  "where you say, so give the address itself") from None
    return host, int(port_text)


class ClusterCollector:
    """prometheus_client's custom collector: ``collect()`` yields the series from ``master`` now."""

    def __init__(self, master) -> None:
        self.master = master
        self._jobs: tuple[float, dict[str, int]] = (0.0, {})

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        master = self.master
        roster = master.roster
        latest = master.healthwatch.latest if getattr(master, "healthwatch", None) else {}
        nodes = sorted(n for n in roster.accepted_nodes() if isinstance(n, str) and NODE_ID_RE.fullmatch(n))

        up = GaugeMetricFamily("pimaster_node_up", "1 when the node answered the last health round", labels=["node"])
        gauges = {name: GaugeMetricFamily(name, help_, labels=["node"]) for name, (help_, _f, _x) in NODE_GAUGES.items()}
        loads = {period: GaugeMetricFamily(f"pimaster_node_load{period}", f"{period}-minute load average",
                                           labels=["node"]) for period in (1, 5, 15)}
        throttled = GaugeMetricFamily("pimaster_node_throttled", "bits of the firmware's throttled word "
                                      "(vcgencmd get_throttled) by name; *_occurred: since boot", labels=["node", "flag"])
        seen = GaugeMetricFamily("pimaster_node_last_seen_timestamp_seconds", "when the master last heard from the node",
                                 labels=["node"])
        sampled = GaugeMetricFamily("pimaster_node_health_timestamp_seconds", "when the latest health sample was taken",
                                    labels=["node"])
        for node in nodes:
            sample = latest.get(node)
            up.add_metric([node], 1.0 if (sample["up"] if sample else roster.connected(node)) else 0.0)
            if roster.last_seen.get(node):
                seen.add_metric([node], float(roster.last_seen[node]))
            if not sample:
                continue
            sampled.add_metric([node], float(sample["time"]))
            if not sample["up"]:
                continue
            for name, (_help, field, factor) in NODE_GAUGES.items():
                if field in sample:
                    gauges[name].add_metric([node], float(sample[field]) * factor)
            for period, value in zip((1, 5, 15), sample.get("load") or []):
                loads[period].add_metric([node], float(value))
            bits = sample.get("throttled")
            if bits is not None:
                for bit, flag in THROTTLE_BITS.items():
                    throttled.add_metric([node, flag], 1.0 if bits & (1 << bit) else 0.0)
        yield up
        yield from gauges.values()
        yield from loads.values()
        yield throttled
        yield seen
        yield sampled

        yield _gauge("pimaster_connected_agents", "accepted nodes whose agent is connected", len(roster.connected_nodes()))
        yield _gauge("pimaster_accepted_nodes", "nodes with an accepted key", len(nodes))
        yield _gauge("pimaster_pending_keys", "keys waiting for a person (pimaster keys accept)",
                     sum(1 for state in roster.key_states.values() if state == "pending"))
        dropped = CounterMetricFamily("pimaster_dropped_messages", "messages the master dropped (malformed, unexpected)")
        dropped.add_metric([], float(master.drops.total))
        yield dropped
        results = GaugeMetricFamily("pimaster_job_node_results", "node results of the jobs kept, by result",
                                    labels=["result"])
        for result, count in sorted(self._job_results().items()):
            results.add_metric([result], float(count))
        yield results
        if getattr(master, "health", None) is not None:
            yield _gauge("pimaster_health_history_bytes", "size of the health history (health.db)",
                         master.health.size_bytes())
            rounds = CounterMetricFamily("pimaster_health_rounds", "health rounds the master has run")
            rounds.add_metric([], float(master.healthwatch.rounds))
            yield rounds

    def _job_results(self) -> dict[str, int]:
        at, counts = self._jobs
        if time.monotonic() - at < JOB_COUNT_CACHE_S and counts:
            return counts
        counts = {name: 0 for name in ("ok", "changed", "failed", "interrupted", "no_answer", "running")}
        try:
            rows = self.master.store.db.execute(
                "SELECT status, CAST(COALESCE(json_extract(summary, '$.failed'), 0) AS INTEGER) > 0, "
                "CAST(COALESCE(json_extract(summary, '$.changed'), 0) AS INTEGER) > 0, COUNT(*) "
                "FROM job_nodes GROUP BY 1, 2, 3").fetchall()
        except Exception as exc:  # a scrape must not fail on the job store
            log.warning("metrics: counting job results failed: %s", exc)
            return counts
        for status, failed, changed, count in rows:
            if status == "done":
                result = "failed" if failed else "changed" if changed else "ok"
            elif status in ("sent", "running"):
                result = "running"
            elif status in ("interrupted", "not_sent"):
                result = "interrupted"
            else:
                result = "no_answer"
            counts[result] += count
        self._jobs = (time.monotonic(), counts)
        return counts


def _gauge(name: str, help_: str, value: float):
    from prometheus_client.core import GaugeMetricFamily

    return GaugeMetricFamily(name, help_, value=float(value))


class MetricsServer:
    """The HTTP endpoint on the master's loop. ``open`` raises ListenError when it cannot bind."""

    def __init__(self, master, host: str, port: int) -> None:
        self.master, self.host, self.port = master, host, port
        self.server: asyncio.base_events.Server | None = None
        self.clients = 0
        self.per_address: dict[str, int] = {}
        self._cached: tuple[float, bytes] | None = None

    async def open(self) -> None:
        from prometheus_client import CollectorRegistry

        from .transport import ListenError

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ClusterCollector(self.master))
        try:
            self.server = await asyncio.start_server(self._client, self.host, self.port, limit=REQUEST_LIMIT)
        except OSError as exc:
            raise ListenError(self.host, self.port, f"{exc.strerror or exc} (--metrics)") from None
        log.info("metrics for Prometheus on http://%s/metrics", _host_port(self.host, self.port))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if self.clients >= MAX_CLIENTS or self.per_address.get(address, 0) >= MAX_CLIENTS_PER_ADDRESS:
            writer.close()
            return
        self.clients += 1
        self.per_address[address] = self.per_address.get(address, 0) + 1
        try:
            status, body = await asyncio.wait_for(self._answer(reader), HEADER_TIMEOUT_S)
            writer.write(status + body)
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError,
                asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("metrics: a scrape failed")
        finally:
            self.clients -= 1
            self.per_address[address] -= 1
            if not self.per_address[address]:
                del self.per_address[address]
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        method, path, *_ = (request.split("\r\n", 1)[0].split(" ") + ["", ""])
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return _head(405, "text/plain", 0), b""
        if path not in ("/metrics", "/"):
            body = b"not found: the metrics are at /metrics\n"
            return _head(404, "text/plain; charset=utf-8", len(body)), body
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] >= CACHE_S:
            self._cached = (now, generate_latest(self.registry))
        body = self._cached[1]
        return _head(200, CONTENT_TYPE_LATEST, len(body)), (b"" if method == "HEAD" else body)


def _head(status: int, content_type: str, length: int) -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n\r\n").encode()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
