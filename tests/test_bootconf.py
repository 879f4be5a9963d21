"""Boot-time enrollment: piagent.conf on the boot partition is taken into /etc/piagent, and the
join token leaves the boot partition once the master has accepted the node.

The discovery logic runs on temp dirs standing in for /boot/firmware, /boot and /etc/piagent; the
loopback tests at the end run a real master and a real `piagent run` without --config.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from harness import Process, agent_python, source_path, wait_for

from piagent import bootconf
from piagent.config import ConfigError

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
TOKEN = "k3VxToken-abc_123"


def token_line(text: str) -> bool:
    """Whether a config text still holds a join token (comments may mention the word)."""
    return any(line.strip().lower().startswith("token") for line in text.splitlines())


def conf(master="10.0.0.1:4510", fingerprint=FP_A, token=TOKEN, node_id=None, comment=True) -> str:
    lines = ["# piagent.conf: put this file on each SD card's boot partition."] if comment else []
    lines += ["[piagent]", f"master = {master}"]
    if fingerprint:
        lines.append(f"fingerprint = {fingerprint}")
    if token:
        lines.append(f"token = {token}")
    if node_id:
        lines.append(f"id = {node_id}")
    return "\n".join(lines) + "\n"


class Card:
    """A Pi's file systems in a temp dir: the boot partition (both mount points), /etc/piagent, state."""

    def __init__(self, root: Path) -> None:
        self.firmware = root / "boot" / "firmware"
        self.boot = root / "boot"
        self.etc_dir = root / "etc" / "piagent"
        self.state_dir = root / "state"
        self.firmware.mkdir(parents=True)
        self.state_dir.mkdir()

    @property
    def boot_dirs(self) -> list[str]:
        return [str(self.firmware), str(self.boot)]

    @property
    def boot_file(self) -> Path:
        return self.firmware / "piagent.conf"

    @property
    def etc_file(self) -> Path:
        return self.etc_dir / "piagent.conf"

    def discover(self) -> bootconf.Discovered:
        return bootconf.discover(str(self.state_dir), self.boot_dirs, str(self.etc_dir))


@pytest.fixture
def card(tmp_path) -> Card:
    return Card(tmp_path)


# ---------------------------------------------------------------------------------------------
# Finding and taking the config

def test_boot_file_is_moved_into_etc_with_its_token_and_owner_only(card):
    card.boot_file.write_text(conf(node_id="node07"))
    found = card.discover()
    assert found.source == "boot" and found.boot_path == str(card.boot_file)
    assert (found.config.master_host, found.config.master_port) == ("10.0.0.1", 4510)
    assert found.config.token == TOKEN and found.config.fingerprint == FP_A and found.config.node_id == "node07"
    etc = card.etc_file.read_text()
    assert f"token = {TOKEN}" in etc and "master = 10.0.0.1:4510" in etc and "id = node07" in etc
    assert stat.S_IMODE(card.etc_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(card.etc_dir.stat().st_mode) == 0o700
    # Not enrolled yet: the boot file is left alone until the master accepts the node.
    assert card.boot_file.read_text() == conf(node_id="node07")


def test_boot_firmware_comes_before_boot(card):
    (card.boot / "piagent.conf").write_text(conf(master="old-place:4510"))
    card.boot_file.write_text(conf(master="new-place:4510"))
    assert card.discover().config.master_host == "new-place"
    card.boot_file.unlink()
    card.etc_file.unlink()
    found = card.discover()  # an older image mounts the boot partition at /boot
    assert found.config.master_host == "old-place" and found.boot_path == str(card.boot / "piagent.conf")


def test_no_config_anywhere_means_pimaster_local_pending_and_trust_on_first_use(card, caplog):
    with caplog.at_level(logging.WARNING, logger="piagent"):
        found = card.discover()
    assert found.source == "default"
    assert (found.config.master_host, found.config.master_port) == ("pimaster.local", 4510)
    assert found.config.token is None and found.config.fingerprint is None
    assert not card.etc_file.exists()
    assert "pimaster.local:4510" in caplog.text and "pending" in caplog.text


def test_etc_config_alone_is_used(card):
    card.etc_dir.mkdir(parents=True)
    card.etc_file.write_text(conf(token=None))
    found = card.discover()
    assert found.source == "etc" and found.boot_path is None
    assert found.config.master_host == "10.0.0.1" and found.config.token is None


def test_windows_edited_file_with_bom_and_crlf_is_accepted(card):
    card.boot_file.write_bytes(b"\xef\xbb\xbf" + conf().replace("\n", "\r\n").encode())
    found = card.discover()
    assert found.config.token == TOKEN and found.config.fingerprint == FP_A


def test_a_file_taken_once_is_not_taken_again_so_edits_in_etc_stay(card):
    card.boot_file.write_text(conf(token=None))
    card.discover()
    card.etc_file.write_text(conf(master="edited-by-hand:4510", token=None))
    assert card.discover().config.master_host == "edited-by-hand"


def test_a_new_boot_file_wins_and_keeps_what_it_leaves_out(card):
    card.boot_file.write_text(conf(token=None, node_id="rack1-07"))
    card.discover()
    # Later a person drops a fresh token for the same master, without an id.
    card.boot_file.write_text(conf(token="second-token", comment=False))
    found = card.discover()
    assert found.source == "boot"
    assert found.config.token == "second-token" and found.config.node_id == "rack1-07"
    assert found.config.fingerprint == FP_A


def test_a_new_master_does_not_inherit_the_old_masters_fingerprint(card):
    card.boot_file.write_text(conf(fingerprint=FP_A))
    card.discover()
    card.boot_file.write_text(conf(master="new-master:4510", fingerprint=None, token="t2"))
    found = card.discover()
    assert found.config.master_host == "new-master"
    assert found.config.fingerprint is None  # trust on first use of the new master, not a wrong pin
    card.boot_file.write_text(conf(master="third:4510", fingerprint=FP_B, token=None))
    found = card.discover()
    assert found.config.fingerprint == FP_B and found.config.token is None


@pytest.mark.parametrize("text, message", [
    ("[piagent]\nmaster = 10.0.0.1\ncolour = blue\n", "unknown setting(s) colour"),
    ("master = 10.0.0.1\n", "File contains no section headers"),
    ("[piagent]\nfingerprint = " + FP_A + "\n", "'master' (host[:port] of the master) is required"),
    ("[piagent]\nmaster = 10.0.0.1\nfingerprint = md5:abc\n", "fingerprint must look like sha256:"),
])
def test_bad_boot_file_is_a_clear_error_naming_the_file(card, text, message):
    card.boot_file.write_text(text)
    with pytest.raises(ConfigError) as raised:
        card.discover()
    assert message in str(raised.value) and str(card.boot_file) in str(raised.value)
    assert not card.etc_file.exists()


def test_bad_boot_file_on_an_enrolled_node_leaves_it_running_on_etc(card, caplog):
    card.boot_file.write_text(conf(token=None))
    card.discover()
    card.boot_file.write_bytes(b"\xff\xfe not text")
    with caplog.at_level(logging.ERROR, logger="piagent"):
        found = card.discover()
    assert found.source == "etc" and found.config.master_host == "10.0.0.1"
    assert "ignoring" in caplog.text and "not UTF-8" in caplog.text


def test_bad_config_in_etc_is_a_clear_error(card):
    card.etc_dir.mkdir(parents=True)
    card.etc_file.write_text("[piagent]\nmaster = host:99999\n")
    with pytest.raises(ConfigError, match="bad port"):
        card.discover()


# ---------------------------------------------------------------------------------------------
# After the master accepts the node: the token leaves the boot partition and /etc

def test_token_is_removed_from_the_boot_file_and_etc_once_accepted(card):
    original = conf(node_id="node07")
    card.boot_file.write_text(original)
    found = card.discover()
    bootconf.forget_token(found)
    boot_text = card.boot_file.read_text()
    assert not token_line(boot_text) and TOKEN not in boot_text
    # Everything else stays visible on the card: the comment, the master, the pin, the id; and a
    # note says where the token went.
    assert boot_text == original.replace(f"token = {TOKEN}\n", bootconf.TOKEN_REMOVED_NOTE)
    etc_text = card.etc_file.read_text()
    assert not token_line(etc_text) and TOKEN not in etc_text and "master = 10.0.0.1:4510" in etc_text
    assert stat.S_IMODE(card.etc_file.stat().st_mode) == 0o600
    assert not [p for p in card.firmware.iterdir() if p.name != "piagent.conf"]  # no temp files left
    # The next start runs on /etc (the rewritten boot file is known) and has no token either.
    again = card.discover()
    assert again.source == "etc" and again.config.token is None
    bootconf.forget_token(again)  # a second acceptance (reconnect) changes nothing
    assert card.boot_file.read_text() == boot_text


def test_token_removed_even_when_the_agent_restarted_before_acceptance(card):
    card.boot_file.write_text(conf())
    card.discover()
    found = card.discover()  # restarted while still pending: the same boot file, not taken twice
    assert found.source == "etc" and found.config.token == TOKEN
    bootconf.forget_token(found)
    assert not token_line(card.boot_file.read_text()) and not token_line(card.etc_file.read_text())


def test_boot_file_replaced_while_running_is_left_for_the_next_start(card):
    card.boot_file.write_text(conf())
    found = card.discover()
    newer = conf(master="other:4510", token="fresh-token")
    card.boot_file.write_text(newer)
    bootconf.forget_token(found)
    assert card.boot_file.read_text() == newer
    assert card.discover().config.token == "fresh-token"


def test_when_the_boot_partition_refuses_the_rename_the_file_is_deleted(card, monkeypatch, caplog):
    card.boot_file.write_text(conf())
    found = card.discover()
    real_replace = os.replace

    def fat_replace(src, dst):  # some FAT drivers refuse a rename over an existing file
        if str(dst) == str(card.boot_file):
            raise OSError(errno.EPERM, "Operation not permitted")
        return real_replace(src, dst)

    monkeypatch.setattr(bootconf.os, "replace", fat_replace)
    with caplog.at_level(logging.WARNING, logger="piagent"):
        bootconf.forget_token(found)
    assert not card.boot_file.exists()
    assert list(card.firmware.iterdir()) == []  # the temp file went too
    assert "deleted it instead" in caplog.text
    monkeypatch.undo()
    found = card.discover()  # its settings live on in /etc
    assert found.source == "etc" and found.config.master_host == "10.0.0.1" and found.config.token is None


def test_a_read_only_boot_partition_is_logged_as_an_error_and_the_agent_goes_on(card, monkeypatch, caplog):
    card.boot_file.write_text(conf())
    found = card.discover()

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    write_atomic = bootconf.write_atomic

    def write_unless_boot(path, *args, **kwargs):
        if os.path.realpath(path) == os.path.realpath(card.boot_file):
            refuse()
        return write_atomic(path, *args, **kwargs)

    monkeypatch.setattr(bootconf, "write_atomic", write_unless_boot)
    monkeypatch.setattr(bootconf.os, "unlink", refuse)
    with caplog.at_level(logging.ERROR, logger="piagent"):
        bootconf.forget_token(found)  # must not raise
    assert "still on the boot partition" in caplog.text and "by hand" in caplog.text
    assert f"token = {TOKEN}" in card.boot_file.read_text()
    assert not token_line(card.etc_file.read_text())


def test_without_token_keeps_other_sections_and_comments():
    text = "# c\n[other]\ntoken = keep-me\n[piagent]\nmaster = m\nToken: x\n  # tail\n"
    assert bootconf.without_token(text) == ("# c\n[other]\ntoken = keep-me\n[piagent]\nmaster = m\n"
                                            + bootconf.TOKEN_REMOVED_NOTE + "  # tail\n")


# ---------------------------------------------------------------------------------------------
# The command line

def run_cli(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=source_path(tmp))
    return subprocess.run([sys.executable, "-m", "piagent", "run", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_cli_bad_boot_file_is_a_clear_error(tmp, card):
    card.boot_file.write_text("[piagent]\nmaster = 10.0.0.1\ncolour = blue\n")
    result = run_cli("--boot-dir", str(card.firmware), "--etc-dir", str(card.etc_dir),
                     "--state-dir", str(card.state_dir), tmp=tmp)
    assert result.returncode == 2
    assert f"piagent: {card.boot_file}: unknown setting(s) colour" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_config_and_boot_dir_together_is_a_clear_error(tmp, card):
    card.boot_file.write_text(conf())
    result = run_cli("--config", str(card.boot_file), "--boot-dir", str(card.firmware),
                     "--state-dir", str(card.state_dir), tmp=tmp)
    assert result.returncode == 2 and "give one of them" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# A real master and a real agent started the way the systemd unit starts it: no --config

def start_discovering_agent(tmp: Path, card: Card, processes: list, node_id: str | None = None) -> Process:
    env = dict(os.environ, PYTHONPATH=source_path(tmp), PYTHONUNBUFFERED="1")
    argv = [agent_python(), "-m", "piagent", "run", "--boot-dir", str(card.firmware), "--boot-dir", str(card.boot),
            "--etc-dir", str(card.etc_dir), "--state-dir", str(card.state_dir)]
    if node_id:
        argv += ["--id", node_id]
    agent = Process(argv, tmp / f"agent-{len(processes)}.log", env).start()
    processes.append(agent)
    return agent


def test_agent_enrolls_from_the_boot_partition_and_the_token_leaves_it(tmp, master, processes):
    card = Card(tmp / "pi")
    config = master.token_config(uses=1)
    card.boot_file.write_text(config)
    agent = start_discovering_agent(tmp, card, processes, node_id="pi07")
    wait_for(lambda: master.key_state("pi07") == ["accepted"], what="pi07 accepted by its token")
    wait_for(lambda: master.up_nodes() == {"pi07"}, what="pi07 answers ping")
    token = config.split("token = ")[1].split()[0]
    wait_for(lambda: token not in card.boot_file.read_text(), timeout=10,
             what="the token gone from the boot partition")
    boot_text = card.boot_file.read_text()
    assert not token_line(boot_text)
    assert f"master = {master.address}" in boot_text and "fingerprint = sha256:" in boot_text
    etc_text = card.etc_file.read_text()
    assert token not in etc_text and f"master = {master.address}" in etc_text
    assert "removed the join token" in agent.output()
    # The token is spent (one use): a restart works on the enrolled key alone.
    agent.stop()
    agent.start()
    wait_for(lambda: master.up_nodes() == {"pi07"}, what="pi07 back after a restart")
    assert master.key_state("pi07") == ["accepted"]
    assert token not in card.boot_file.read_text() and token not in card.etc_file.read_text()


def test_agent_without_token_waits_pending_and_the_accept_needs_no_restart(tmp, master, processes):
    card = Card(tmp / "pi")
    card.boot_file.write_text(master.token_config(token=False))
    agent = start_discovering_agent(tmp, card, processes, node_id="pi08")
    wait_for(lambda: master.key_state("pi08") == ["pending"], what="pi08 pending")
    master.cli("keys", "accept", "pi08")
    wait_for(lambda: master.up_nodes() == {"pi08"}, timeout=15, what="pi08 up after accept")
    assert agent.alive()


def test_once_enrolled_the_token_is_spent_for_this_agent_even_if_uses_remain(tmp, master, processes):
    card = Card(tmp / "pi")
    card.boot_file.write_text(master.token_config(uses=5))
    agent = start_discovering_agent(tmp, card, processes, node_id="pi09")
    wait_for(lambda: master.up_nodes() == {"pi09"}, what="pi09 up")
    wait_for(lambda: not token_line(card.etc_file.read_text()), timeout=10, what="the token gone from /etc")
    # A person deletes the key; the agent (the same process) enrolls again when it reconnects, here
    # after a master restart, but not by the token it has forgotten: it waits as pending.
    master.cli("keys", "delete", "pi09")
    master.stop()
    master.start()
    wait_for(lambda: master.key_state("pi09") == ["pending"], timeout=30, what="pi09 pending again")
    assert agent.alive()
