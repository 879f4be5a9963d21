"""piagent.conf: the small file a person drops on each SD card's boot partition.

    [piagent]
    master = pimaster.local:4510
    fingerprint = sha256:3b9c…
    token = k3Vx…
    # id = node07            (optional; defaults to the hostname at first start)

`pimaster token create` writes it. Everything but `master` is optional: without a fingerprint
the agent trusts the master key it sees first and refuses any other afterwards; without a token
it waits as pending until a person runs `pimaster keys accept`.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import dataclass

from .protocol import CONFIG_SECTION as SECTION
from .protocol import DEFAULT_PORT
from .protocol import NODE_ID_RE, ConfigError, parse_address  # noqa: F401 (re-exported)

FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass
class AgentConfig:
    master_host: str
    master_port: int = DEFAULT_PORT
    fingerprint: str | None = None
    token: str | None = None
    node_id: str | None = None
    path: str | None = None


def validate_node_id(node_id: str) -> str:
    if not NODE_ID_RE.match(node_id):
        raise ConfigError(f"node id {node_id!r} must be 1-63 letters, digits, '.', '_' or '-'")
    return node_id


def parse_config(text: str, path: str | None = None) -> AgentConfig:
    where = path or "piagent.conf"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=where)
    except configparser.Error as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if not parser.has_section(SECTION):
        raise ConfigError(f"{where}: no [{SECTION}] section")
    section = parser[SECTION]
    unknown = set(section) - {"master", "fingerprint", "token", "id"}
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    if not section.get("master"):
        raise ConfigError(f"{where}: 'master' (host[:port] of the master) is required")
    host, port = parse_address(section["master"])
    fp = section.get("fingerprint") or None
    if fp is not None and not FINGERPRINT_RE.match(fp.strip().lower()):
        raise ConfigError(f"{where}: fingerprint must look like sha256:<64 hex digits>")
    node_id = section.get("id") or None
    if node_id:
        validate_node_id(node_id)
    return AgentConfig(master_host=host, master_port=port,
                       fingerprint=fp.strip().lower() if fp else None,
                       token=(section.get("token") or "").strip() or None,
                       node_id=node_id, path=path)


def load_config(path: str) -> AgentConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    return parse_config(text, path)
