"""piagent.conf: the small file a person drops on each SD card's boot partition.

    [piagent]
    master = pimaster.local:4510
    fingerprint = sha256:3b9c…
    token = k3Vx…
    # id = node07            (optional; defaults to the hostname at first start)

`pimaster token create` writes it. Everything but `master` is optional: without a token it waits
as pending until a person runs `pimaster keys accept`. Without a fingerprint the master is pinned
by `piagent trust FINGERPRINT` (the file master.fingerprint in the state dir), and with neither the
agent trusts the master key it sees first and refuses any other afterwards (trust on first use:
whoever answers first at the master's address gets the node). A fingerprint in the config and one
given to `piagent trust` must agree, or the agent refuses to start.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass

from .fileio import write_atomic
from .protocol import DEFAULT_PORT

# The enrollment contract, shared with the master (which writes this file with render_config).
CONFIG_SECTION = "piagent"
# \A...\Z, not ^...$: "$" also matches before a trailing newline, so "node01\n" would pass a
# .match(). With these anchors .match() and .search() are as strict as .fullmatch().
NODE_ID_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")


class ConfigError(ValueError):
    """A bad setting in piagent.conf or a bad address."""


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port` -> (host, port)."""
    text = text.strip()
    if not text:
        raise ConfigError("empty master address")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"no host in master address {text!r}")
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65535:
            raise ConfigError(f"bad port in master address {text!r}")
        return host, int(port_text)
    return host, default_port


def render_config(master: str, fingerprint: str, token: str | None, comment: str = "") -> str:
    lines = [f"# {line}" for line in comment.splitlines()] if comment else []
    lines += [f"[{CONFIG_SECTION}]", f"master = {master}", f"fingerprint = {fingerprint}"]
    if token:
        lines.append(f"token = {token}")
    return "\n".join(lines) + "\n"


SECTION = CONFIG_SECTION

# Full-match patterns (\A...\Z): "$" would let a trailing newline through a .match().
FINGERPRINT_RE = re.compile(r"\Asha256:[0-9a-f]{64}\Z")
# In the state dir: the fingerprint pinned by `piagent trust`, and the master key last seen (with
# no pin at all, the one trusted at first contact).
TRUST_FILE = "master.fingerprint"
MASTER_KEY_CACHE = "master.pub"


@dataclass
class AgentConfig:
    master_host: str
    master_port: int = DEFAULT_PORT
    fingerprint: str | None = None
    token: str | None = None
    node_id: str | None = None
    path: str | None = None


def validate_node_id(node_id: str) -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
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
    if fp is not None and not FINGERPRINT_RE.fullmatch(fp.strip().lower()):
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


# ------------------------------------------------------------------------------------- piagent trust
def validate_fingerprint(text: str) -> str:
    """``text`` as a fingerprint (lower-cased), exactly: no surrounding space, no trailing newline."""
    if not isinstance(text, str) or not FINGERPRINT_RE.fullmatch(text.lower()):
        raise ConfigError(f"{text!r} is not a master fingerprint: it must be sha256: and 64 hex digits, "
                          "nothing before or after (`pimaster keys fingerprint` on the master prints it)")
    return text.lower()


def read_trusted_fingerprint(state_dir: str) -> str | None:
    """The fingerprint `piagent trust` pinned in ``state_dir``, None if none was.

    A file that is there but not a fingerprint is a ConfigError, never "no pin": the agent must
    not fall back to trusting whoever answers because someone mangled the file.
    """
    path = os.path.join(state_dir, TRUST_FILE)
    try:
        with open(path, "rb") as fh:
            data = fh.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        # One line, as `piagent trust` writes it; the final newline is the file's, not the value's.
        text = data.decode("ascii")
        text = text[:-1] if text.endswith("\n") else text
        return validate_fingerprint(text)
    except (UnicodeDecodeError, ConfigError):
        raise ConfigError(f"{path} does not hold a master fingerprint; run `piagent trust FINGERPRINT` "
                          "again, or remove the file") from None


def write_trusted_fingerprint(state_dir: str, fingerprint: str) -> str:
    """Pin ``fingerprint`` (validated) in ``state_dir``, atomically. Returns the file's path."""
    fingerprint = validate_fingerprint(fingerprint)
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, TRUST_FILE)
    write_atomic(path, (fingerprint + "\n").encode(), 0o644)
    return path


def pinned_fingerprint(config: AgentConfig, state_dir: str) -> tuple[str | None, str | None]:
    """The master fingerprint the agent is pinned to and what pins it, (None, None) for none.

    The config's `fingerprint` and `piagent trust`'s file count the same; if both are there they
    must agree, else ConfigError: the agent will not guess which of two masters is the right one.
    """
    trusted = read_trusted_fingerprint(state_dir)
    where = config.path or "piagent.conf"
    if config.fingerprint and trusted and config.fingerprint != trusted:
        raise ConfigError(f"{where} pins the master to {config.fingerprint}, but `piagent trust` pinned "
                          f"{trusted} ({os.path.join(state_dir, TRUST_FILE)}): they must agree. Correct the "
                          f"config's fingerprint, or if the config is right, run `piagent trust {config.fingerprint}`")
    if config.fingerprint:
        return config.fingerprint, where
    if trusted:
        return trusted, f"`piagent trust` ({os.path.join(state_dir, TRUST_FILE)})"
    return None, None


def cached_master_fingerprint(state_dir: str) -> str | None:
    """The fingerprint of the master key the agent last connected to (master.pub), if any."""
    from .keys import fingerprint, is_public_key

    try:
        with open(os.path.join(state_dir, MASTER_KEY_CACHE), "rb") as fh:
            key = fh.read(4096).strip()
    except OSError:
        return None
    return fingerprint(key) if is_public_key(key) else None
