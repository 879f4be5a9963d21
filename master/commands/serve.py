"""`pimaster serve`: run the master daemon (see `pimaster.server`)."""

from __future__ import annotations

import sys

from ..cli import EXIT_USAGE

ZMQ_TCP_PREFIX = "tcp://"
# Jobs kept by default (`--keep-jobs`, `--keep-days`): months of daily applies on a cluster, a few
# megabytes on the SD card. Here rather than in pimaster.server, which `serve --help` does not import.
DEFAULT_KEEP_JOBS = 500
DEFAULT_KEEP_DAYS = 90


def add_parser(sub, name, summary, common, as_json) -> None:
    serve = sub.add_parser(name, parents=[common], help=summary)
    serve.add_argument("--listen", default="0.0.0.0:4510", help="address and port agents connect to: HOST:PORT, [V6]:PORT or tcp://HOST:PORT "
                       "(default 0.0.0.0:4510)")
    serve.add_argument("--key-port", type=int, help="plaintext key-announce port (default: listen port + 1)")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--max-pending", type=int, default=256,
                       help="keys that may wait for a person at once; new keys past it are not stored (default 256)")
    serve.add_argument("--keep-jobs", type=int, default=DEFAULT_KEEP_JOBS, metavar="N",
                       help=f"keep the newest N jobs and their results, 0 for any number (default {DEFAULT_KEEP_JOBS})")
    serve.add_argument("--keep-days", type=float, default=DEFAULT_KEEP_DAYS, metavar="D",
                       help=f"keep jobs of the last D days, 0 for any age (default {DEFAULT_KEEP_DAYS}); older or past "
                            "--keep-jobs, jobs are deleted at start, as new ones are recorded and hourly, "
                            "never while they run")
    serve.add_argument("--cluster-dir", metavar="DIR",
                       help="the cluster's state tree: its cluster.yaml's `apply:` list is what `pimaster apply` "
                            "with no file, enrollment and drift checks apply (default: the shipped states)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="export the cluster's health in Prometheus' text format on http://HOST:PORT/metrics "
                            "(HOST an IP address or localhost; off by default; no authentication: an address "
                            "only those who may see the cluster's health reach, e.g. 127.0.0.1:9466)")
    serve.set_defaults(run=run, needs_master=False)


def listen_address(text: str) -> tuple[str, int]:
    """`--listen`: `HOST[:PORT]`, `[V6]:PORT`, or ZeroMQ's own form of the same, `tcp://HOST:PORT`
    (`tcp://*:4510`: every address, as `0.0.0.0:4510`). Raises ConfigError."""
    from piagent.config import ConfigError, parse_address

    text = text.strip()
    if "://" in text:
        if not text.lower().startswith(ZMQ_TCP_PREFIX):
            raise ConfigError(f"only tcp:// addresses can be listened on, not {text!r}")
        text = text[len(ZMQ_TCP_PREFIX):]
    host, port = parse_address(text)
    return ("0.0.0.0" if host == "*" else host), port


def run(args) -> int:
    from piagent.config import ConfigError

    from piagent import sd
    from ..server import serve

    sd.setup_logging("pimaster", args.log_level)
    try:
        host, port = listen_address(args.listen)
    except ConfigError as exc:
        print(f"pimaster: --listen: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.max_pending < 1:
        print("pimaster: --max-pending must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.keep_jobs < 0 or not args.keep_days >= 0:  # `not >=`: NaN too
        print("pimaster: --keep-jobs and --keep-days must be 0 (no bound) or more", file=sys.stderr)
        return EXIT_USAGE
    if args.metrics is not None:
        from ..metrics import MetricsAddressError, parse_metrics_address

        try:
            parse_metrics_address(args.metrics)
            import prometheus_client  # noqa: F401
        except MetricsAddressError as exc:
            print(f"pimaster: --metrics: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except ImportError:
            print("pimaster: --metrics needs prometheus_client: apt install python3-prometheus-client "
                  "(or pip install prometheus-client)", file=sys.stderr)
            return EXIT_USAGE
    return serve(args.state_dir, host, port, args.key_port, args.max_pending, args.keep_jobs, args.keep_days,
                 cluster_dir=args.cluster_dir, metrics=args.metrics)
