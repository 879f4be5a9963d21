"""Boot-time enrollment: the agent's config comes from the SD card's boot partition.

People already drop an `ssh` file onto a fresh card; `piagent.conf` (from `pimaster token create`)
goes next to it. `piagent run` without --config calls discover(), which:

1. looks for /boot/firmware/piagent.conf, then /boot/piagent.conf (bookworm mounts the FAT
   partition at /boot/firmware, older images at /boot); the first that exists counts;
2. if that file is new -- not the one taken last time, whose SHA-256 is kept in the state dir
   (boot-conf.sha256) -- validates it and merges it into /etc/piagent/piagent.conf (written
   atomically, 0600): every setting the boot file sets wins; one it leaves out is kept from /etc,
   except `fingerprint` and `token` when the boot file names another master (they belong to the
   old one). "New" is judged by content, not by modification time: a Pi without a clock battery
   may boot with a clock behind the laptop that wrote the card;
3. runs on /etc/piagent/piagent.conf; with no config anywhere, on the defaults: the master at
   pimaster.local:4510 (mDNS, which Raspberry Pi OS resolves), no token (the key waits as pending
   for a person), no fingerprint: unless `piagent trust` pinned one, the master's key is trusted on
   first contact (see daemon.Agent._check_master_key), so on a shared LAN whoever answers
   pimaster.local first gets the node.

The token stays in /etc/piagent (root only) until the master accepts the agent; then
forget_token() removes it from there and from the boot partition, which any card reader can read.
The boot file is rewritten without its token line (temp file, then rename), keeping the master
and fingerprint visible to whoever looks at the card; where the FAT driver refuses the rename it
is deleted instead (its settings live in /etc by then), and if neither works (a read-only mount)
an ERROR in the journal says to remove the token by hand. A file is replaced whole or not at all.
"""

from __future__ import annotations

import configparser
import hashlib
import logging
import os
import re
from dataclasses import dataclass

from .config import AgentConfig, ConfigError, parse_config
from .config import CONFIG_SECTION, parse_address
from .fileio import write_atomic
from .protocol import DEFAULT_PORT

log = logging.getLogger("piagent")

CONFIG_NAME = "piagent.conf"
DEFAULT_BOOT_DIRS = ("/boot/firmware", "/boot")
DEFAULT_ETC_DIR = "/etc/piagent"
DEFAULT_MASTER_HOST = "pimaster.local"
APPLIED_RECORD = "boot-conf.sha256"
# The order settings are written in; parse_config accepts exactly these.
SETTINGS = ("master", "fingerprint", "token", "id")
_TOKEN_LINE = re.compile(r"^\s*token\s*[=:]", re.IGNORECASE)
_SECTION_LINE = re.compile(r"^\s*\[(?P<name>[^\]]+)\]")


@dataclass
class Discovered:
    """What discover() found and did: the config to run with, and where it came from."""

    config: AgentConfig
    source: str                    # "boot" (taken from the boot file now), "etc", or "default"
    etc_path: str
    state_dir: str
    boot_path: str | None = None   # the boot file this agent's settings came from, if any


# ------------------------------------------------------------------------------------- reading
def _decode(data: bytes, path: str) -> str:
    try:
        # utf-8-sig: Windows editors put a byte-order mark in front, which configparser chokes on.
        return data.decode("utf-8-sig").replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None


def _read(path: str) -> bytes | None:
    """The file's bytes, None if it does not exist; ConfigError if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def settings_of(text: str, path: str) -> dict[str, str]:
    """The [piagent] settings as written (validated by parse_config first), without empty ones."""
    parse_config(text, path)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text, source=path)
    return {key: value.strip() for key, value in parser[CONFIG_SECTION].items() if value.strip()}


def _same_master(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return parse_address(a) == parse_address(b)


def merge(etc: dict[str, str], boot: dict[str, str]) -> dict[str, str]:
    """The boot file's settings win; /etc keeps what the boot file leaves out, except that a
    fingerprint or token of another master is dropped rather than paired with the new one."""
    merged = dict(etc)
    if not _same_master(etc.get("master"), boot["master"]):
        merged.pop("fingerprint", None)
        merged.pop("token", None)
    merged.update(boot)
    return merged


def render(settings: dict[str, str], origin: str) -> str:
    lines = [f"# Taken by piagent from {origin}. Edit here, or drop a new piagent.conf onto the",
             "# boot partition (it then wins). The token is removed once the master accepts this node.",
             f"[{CONFIG_SECTION}]"]
    lines += [f"{key} = {settings[key]}" for key in SETTINGS if settings.get(key)]
    return "\n".join(lines) + "\n"


TOKEN_REMOVED_NOTE = "# (the join token was removed here once the master accepted this node)\n"


def without_token(text: str) -> str:
    """The config text with the token line(s) of the [piagent] section replaced by a note saying
    so (a person reading the card should not wonder where it went), all else kept as it was."""
    kept, section, noted = [], None, False
    for line in text.splitlines(keepends=True):
        header = _SECTION_LINE.match(line)
        if header:
            section = header.group("name").strip()
        elif section == CONFIG_SECTION and _TOKEN_LINE.match(line):
            if not noted:
                kept.append(TOKEN_REMOVED_NOTE)
                noted = True
            continue
        kept.append(line)
    return "".join(kept)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _applied_digest(state_dir: str) -> str:
    try:
        with open(os.path.join(state_dir, APPLIED_RECORD)) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _record_applied(state_dir: str, data: bytes) -> None:
    write_atomic(os.path.join(state_dir, APPLIED_RECORD), (digest(data) + "\n").encode(), 0o600)


def find_boot_file(boot_dirs: tuple[str, ...] | list[str]) -> str | None:
    for directory in boot_dirs:
        path = os.path.join(directory, CONFIG_NAME)
        if os.path.lexists(path):
            return path
    return None


# ------------------------------------------------------------------------------------- discovery
def discover(state_dir: str, boot_dirs: tuple[str, ...] | list[str] = DEFAULT_BOOT_DIRS,
             etc_dir: str = DEFAULT_ETC_DIR) -> Discovered:
    """Find the agent's config (see the module docstring) and take a new boot file into /etc.

    Raises ConfigError, with a message for people, when no usable config can be had: an invalid
    /etc config, an invalid boot file with nothing in /etc to fall back on, or /etc not writable.
    """
    etc_path = os.path.join(etc_dir, CONFIG_NAME)
    etc_data = _read(etc_path)
    etc_settings: dict[str, str] = {}
    if etc_data is not None:
        etc_settings = settings_of(_decode(etc_data, etc_path), etc_path)

    boot_path = find_boot_file(boot_dirs)
    boot_data = None
    if boot_path:
        try:
            boot_data = _read(boot_path)
            if boot_data is None:  # a dangling symlink, or removed just now
                raise ConfigError(f"{boot_path} cannot be opened")
            boot_settings = settings_of(_decode(boot_data, boot_path), boot_path)
        except ConfigError as exc:
            if etc_data is None:
                raise
            # A node that is enrolled already stays manageable; the journal says what is wrong.
            log.error("ignoring %s: %s. Still running on %s; fix the file (or remove it) and restart "
                      "the agent (systemctl restart piagent).", boot_path, exc, etc_path)
            boot_path = boot_data = None

    if boot_path and boot_data is not None:
        if etc_data is not None and digest(boot_data) == _applied_digest(state_dir):
            log.debug("%s was taken into %s before; not again", boot_path, etc_path)
        else:
            settings = merge(etc_settings, boot_settings)
            try:
                os.makedirs(etc_dir, mode=0o700, exist_ok=True)
                write_atomic(etc_path, render(settings, boot_path).encode(), 0o600)
                _record_applied(state_dir, boot_data)
            except OSError as exc:
                raise ConfigError(f"cannot write {etc_path}: {exc.strerror or exc}") from None
            log.info("took the settings of %s into %s%s", boot_path, etc_path,
                     " (the token stays there until the master accepts this node)" if "token" in settings else "")
            config = parse_config(render(settings, boot_path), etc_path)
            return Discovered(config, "boot", etc_path, state_dir, boot_path)

    if etc_data is not None:
        config = parse_config(_decode(etc_data, etc_path), etc_path)
        return Discovered(config, "etc", etc_path, state_dir, boot_path)

    log.warning("no %s in %s or %s: looking for the master at %s:%d and waiting there as pending "
                "until a person accepts this node (pimaster keys accept); unless `piagent trust` pinned "
                "the master, the first key seen there is trusted", CONFIG_NAME,
                ", ".join(boot_dirs), etc_dir, DEFAULT_MASTER_HOST, DEFAULT_PORT)
    return Discovered(AgentConfig(master_host=DEFAULT_MASTER_HOST, master_port=DEFAULT_PORT),
                      "default", etc_path, state_dir, None)


# ------------------------------------------------------------------------------------- after enrollment
def _forget_in_etc(etc_path: str) -> None:
    data = _read(etc_path)
    if data is None:
        return
    text = _decode(data, etc_path)
    stripped = without_token(text)
    if stripped != text:
        write_atomic(etc_path, stripped.encode(), 0o600)
        log.info("removed the join token from %s: this node is enrolled", etc_path)


def _forget_on_boot_partition(boot_path: str, state_dir: str) -> None:
    data = _read(boot_path)
    if data is None:
        return
    if digest(data) != _applied_digest(state_dir):
        # A new file dropped while the agent ran: the next start takes it (with its token).
        log.info("%s changed since the agent started; it is taken at the next start", boot_path)
        return
    text = _decode(data, boot_path)
    stripped = without_token(text)
    if stripped == text:
        return
    new = stripped.encode()
    try:
        write_atomic(boot_path, new)  # FAT: its mode and owner kept, so none is set
        _record_applied(state_dir, new)
        log.info("removed the join token from %s (anyone with a card reader could read it there)", boot_path)
        return
    except OSError as exc:
        replace_error = exc
    try:
        os.unlink(boot_path)
        log.warning("could not rewrite %s (%s); deleted it instead: its settings are in /etc/piagent",
                    boot_path, replace_error.strerror or replace_error)
    except OSError as exc:
        log.error("the join token is still on the boot partition, readable by anyone with a card "
                  "reader: could neither rewrite nor delete %s (%s). Remove its token line by hand.",
                  boot_path, exc.strerror or exc)


def forget_token(found: Discovered) -> None:
    """Called when the master has accepted this agent: the join token is no longer needed anywhere.

    Never raises: a failure here must not stop an enrolled agent; it is logged instead.
    """
    try:
        _forget_in_etc(found.etc_path)
    except (OSError, ConfigError) as exc:
        log.error("could not remove the join token from %s: %s", found.etc_path, getattr(exc, "strerror", None) or exc)
    if found.boot_path:
        try:
            _forget_on_boot_partition(found.boot_path, found.state_dir)
        except (OSError, ConfigError) as exc:
            log.error("could not remove the join token from %s: %s", found.boot_path,
                      getattr(exc, "strerror", None) or exc)
