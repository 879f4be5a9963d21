"""`pimaster backup` and `pimaster restore` on loopback: a real master and agent, the master's state
dir wiped and put back from the file, the agent reconnecting to the restored master unchanged."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from harness import Master, wait_for

SECRET_STATE = """\
app-key:
  file.managed:
    - name: {path}
    - contents: "{{{{ secret('app.key', 48) }}}}"
"""


def cli(master: Master, *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    """`pimaster ARGS --state-dir` (the master's) without checking its exit status."""
    return subprocess.run([master.python, "-m", "pimaster", *args, "--state-dir", str(master.state_dir)],
                          capture_output=True, text=True, env=master.env, timeout=120,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def snapshot(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (the lock and the socket aside): what must not change."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in ("master.lock", "control.sock")}


def enrolled_master_with_a_job(tmp, master, start_agent):
    """Master with agent n1 enrolled and one finished job that wrote a secret to a file of n1's."""
    agent = start_agent("n1", master.token_config())
    wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
    state = tmp / "secret.yaml"
    state.write_text(SECRET_STATE.format(path=tmp / "app.key"))
    report = json.loads(master.cli("apply", str(state), "--json", timeout=120).stdout)
    assert report["nodes"]["n1"]["ok"], report
    return agent, state, report["job"]


def test_a_restored_master_is_the_same_master_and_its_agent_reconnects_without_enrolling(tmp, master, start_agent):
    agent, state, job = enrolled_master_with_a_job(tmp, master, start_agent)
    fingerprint = master.cli("keys", "fingerprint").stdout.strip()
    secret = (master.state_dir / "secrets" / "app.key").read_bytes()
    backup = tmp / "master.backup"
    backup.write_text("an older backup, readable by anyone\n")
    backup.chmod(0o644)

    made = cli(master, "backup", str(backup), "--json", umask=0)  # while the master runs; a lax umask
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["fingerprint"] == fingerprint and summary["accepted"] == 1 and summary["jobs"] == 1
    assert {"master.key", "master.pub", "pimaster.db", "secrets/app.key"} <= set(summary["files"])
    assert "control.sock" not in summary["files"] and "master.lock" not in summary["files"]
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600

    master.stop()
    shutil.rmtree(master.state_dir)  # the dead SD card
    restored = cli(master, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert fingerprint in restored.stdout and "start it" in restored.stdout
    master.start()  # the same port, the agent still running all along

    wait_for(lambda: master.up_nodes() == {"n1"}, timeout=40, what="n1 back on the restored master")
    assert master.key_state("n1") == ["accepted"]
    assert master.cli("keys", "fingerprint").stdout.strip() == fingerprint
    assert "REFUSING" not in agent.output()
    assert [j["id"] for j in master.json("jobs")["jobs"]] == [job]
    assert (master.state_dir / "secrets" / "app.key").read_bytes() == secret
    assert stat.S_IMODE((master.state_dir / "master.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(master.state_dir.stat().st_mode) == 0o700
    # The same secret: applied again, nothing changes on the node.
    again = json.loads(master.cli("apply", str(state), "--json", timeout=120).stdout)
    assert again["nodes"]["n1"]["ok"] and again["nodes"]["n1"]["changed"] == 0, again


def test_an_encrypted_backup_needs_its_passphrase_and_a_wrong_one_changes_nothing(tmp, master, start_agent):
    enrolled_master_with_a_job(tmp, master, start_agent)
    passphrase, wrong = tmp / "pass", tmp / "wrong"
    passphrase.write_text("correct horse battery staple\n")
    wrong.write_text("correct horse battery stapler\n")
    backup = tmp / "master.backup"
    made = cli(master, "backup", str(backup), "--passphrase-file", str(passphrase), "--json")
    assert made.returncode == 0 and json.loads(made.stdout)["encrypted"], made.stderr
    data = backup.read_bytes()
    assert (master.state_dir / "master.key").read_bytes().strip() not in data
    assert b'"kdf": "scrypt"' in data and b"AES-256-GCM" in data  # the header says how, for a later pimaster

    fresh = Master(tmp, name="fresh")
    refused = cli(fresh, "restore", str(backup), "--passphrase-file", str(wrong), "--json")
    assert refused.returncode == 2 and "wrong passphrase" in json.loads(refused.stdout)["error"]
    assert not (fresh.state_dir / "master.key").exists()
    missing = cli(fresh, "restore", str(backup))
    assert missing.returncode == 2 and "--passphrase-file" in missing.stderr
    assert not (fresh.state_dir / "master.key").exists()

    restored = cli(fresh, "restore", str(backup), "--passphrase-file", str(passphrase))
    assert restored.returncode == 0, restored.stderr
    assert snapshot(fresh.state_dir)["secrets/app.key"] == snapshot(master.state_dir)["secrets/app.key"]
    assert (fresh.state_dir / "master.key").read_bytes() == (master.state_dir / "master.key").read_bytes()


def test_a_damaged_or_truncated_backup_is_refused_and_changes_nothing(tmp, master, start_agent):
    enrolled_master_with_a_job(tmp, master, start_agent)
    passphrase = tmp / "pass"
    passphrase.write_text("s3cret passphrase\n")
    plain, encrypted = tmp / "plain.backup", tmp / "encrypted.backup"
    assert cli(master, "backup", str(plain)).returncode == 0
    assert cli(master, "backup", str(encrypted), "--passphrase-file", str(passphrase)).returncode == 0
    master.stop()
    before = snapshot(master.state_dir)
    header_end = plain.read_bytes().index(b"\n", len(b"pimaster-backup 1\n")) + 1

    def damaged(source, how):
        data = bytearray(source.read_bytes())
        if how == "truncated":
            data = data[:len(data) * 2 // 3]
        elif how == "flipped":
            data[header_end + (len(data) - header_end) // 2] ^= 0x01
        elif how == "header":
            data = data.replace(b'"hostname": "', b'"hostname": "X', 1)
        target = tmp / f"{source.stem}-{how}.backup"
        target.write_bytes(bytes(data))
        return target

    cases = {(plain, "truncated"): "truncated", (plain, "flipped"): "checksum", (encrypted, "truncated"): "truncated",
             (encrypted, "flipped"): "AES-GCM", (encrypted, "header"): "AES-GCM"}
    for (source, how), reason in cases.items():
        args = ["--passphrase-file", str(passphrase)] if source == encrypted else []
        result = cli(master, "restore", str(damaged(source, how)), "--force", *args)
        assert result.returncode == 2 and reason in result.stderr, (source.name, how, result.stderr)
        assert snapshot(master.state_dir) == before, f"{source.name} {how} changed the state dir"
    other = tmp / "not-a-backup"
    other.write_bytes(b"PK\x03\x04 a zip file")
    result = cli(master, "restore", str(other), "--force")
    assert result.returncode == 2 and "not a pimaster backup" in result.stderr
    assert snapshot(master.state_dir) == before


def test_restore_refuses_a_running_master_and_one_with_keys_unless_forced(tmp, master, start_agent):
    enrolled_master_with_a_job(tmp, master, start_agent)
    backup = tmp / "master.backup"
    assert cli(master, "backup", str(backup)).returncode == 0
    running = cli(master, "restore", str(backup), "--force", "--json")
    assert running.returncode == 2 and "a master is running" in json.loads(running.stdout)["error"]
    master.stop()
    assert cli(master, "backup", str(backup)).returncode == 0  # a stopped master backs up too

    # Another master with keys of its own (a stopped one: restore never touches a running master).
    other = Master(tmp, name="other").start()
    start_agent("n9", other.token_config())
    wait_for(lambda: other.key_state("n9") == ["accepted"], what="n9 accepted by the other master")
    other.stop()
    other_fingerprint = (other.state_dir / "master.pub").read_bytes()
    before = snapshot(other.state_dir)
    refused = cli(other, "restore", str(backup))
    assert refused.returncode == 2 and "1 agent key(s)" in refused.stderr and "--force" in refused.stderr
    assert snapshot(other.state_dir) == before
    forced = cli(other, "restore", str(backup), "--force")
    assert forced.returncode == 0, forced.stderr
    assert "replaced master" in forced.stdout
    assert (other.state_dir / "master.pub").read_bytes() == (master.state_dir / "master.pub").read_bytes()
    assert (other.state_dir / "master.pub").read_bytes() != other_fingerprint
    assert not (other.state_dir / "pimaster.db-wal").exists()  # no old WAL left to replay into it
    other.start()
    try:
        assert [k["id"] for k in other.json("keys", "list")["keys"]] == ["n1"]
    finally:
        other.stop()


def test_backup_refuses_a_file_inside_the_state_dir_and_a_state_dir_without_master(tmp, master):
    inside = cli(master, "backup", str(master.state_dir / "x.backup"))
    assert inside.returncode == 2 and "inside the master's state dir" in inside.stderr
    assert not (master.state_dir / "x.backup").exists()
    nothing = cli(Master(tmp, name="none"), "backup", str(tmp / "none.backup"))
    assert nothing.returncode == 2 and "no master state dir" in nothing.stderr
    assert not (tmp / "none.backup").exists()


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_help_says_how_the_file_is_encrypted(tmp, command):
    env = dict(Master(tmp).env)
    usage = subprocess.run([sys.executable, "-m", "pimaster", command, "--help"], capture_output=True, text=True,
                           env=env, timeout=60).stdout
    flat = " ".join(usage.split())
    assert "--passphrase-file FILE" in flat
    if command == "backup":
        assert "scrypt (N=2^17, r=8, p=1" in flat and "AES-256-GCM" in flat
    else:
        assert "--force" in flat
