"""The cure for a dead master SD card, on the 4-node lab: `pimaster backup` in node01 while the master
runs, the master stopped and its state dir wiped, `pimaster restore`, the master started again:
every agent answers ping with no card touched, and the Slurm cluster's states change nothing (the
munge key, a secret of the master's, came back with it).

Named after test_shipped_states.py so that it runs after it (and after test_lab.py, whose first
test expects nodes nothing was applied to yet): slurm is converged by then, and its apply here
finds it so; its name is not test_backup.py, which tests/ has already (one pytest run collects both)."""

from __future__ import annotations

import json

import pytest

from lab_harness import Lab, describe

pytestmark = pytest.mark.lab

MASTER = "node01"
BACKUP = "/root/master.backup"
PASSPHRASE = "/root/backup.pass"
STATE_DIR = "/var/lib/pimaster"   # the master's state dir in node01 (the packaged unit's)


def apply_slurm(lab: Lab) -> dict:
    result = lab.pimaster("apply", "slurm", "--json", check=False, timeout=900)
    try:
        report = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"pimaster apply slurm printed no report: {describe(result)}") from None
    failed = {n: [s["name"] for s in r["states"] if s["status"] == "failed"] for n, r in report["nodes"].items()
              if r["status"] != "done" or r["failed"]}
    assert sorted(report["nodes"]) == sorted(lab.nodes) and not failed, failed
    return report


def test_backup_wipe_restore_every_agent_answers_and_slurm_changes_nothing(lab: Lab):
    apply_slurm(lab)
    munge_key = (lab.master_state_dir / "secrets" / "munge.key").read_bytes()
    fingerprint = lab.pimaster("keys", "fingerprint").stdout.strip()
    jobs = lab.job_ids()
    lab.write_file(MASTER, PASSPHRASE, "lab backup passphrase\n")
    try:
        made = json.loads(lab.pimaster("backup", BACKUP, "--passphrase-file", PASSPHRASE, "--json").stdout)
        assert made["fingerprint"] == fingerprint and made["encrypted"] and made["accepted"] == len(lab.nodes)
        assert lab.exec(MASTER, "stat", "-c", "%a", BACKUP).stdout.strip() == "600"

        lab.exec(MASTER, "systemctl", "stop", "pimaster")
        lab.exec(MASTER, "find", STATE_DIR, "-mindepth", "1", "-delete")   # the dead card: a fresh install
        assert lab.exec(MASTER, "ls", "-A", STATE_DIR).stdout == ""
        restored = lab.pimaster("restore", BACKUP, "--passphrase-file", PASSPHRASE)
        assert fingerprint in restored.stdout, describe(restored)
        lab.exec(MASTER, "systemctl", "start", "pimaster")

        Lab.wait_for(lab.all_up, "every agent answering the restored master", timeout=120, interval=1)
        assert lab.pimaster("keys", "fingerprint").stdout.strip() == fingerprint
        assert lab.job_ids() == jobs
        assert (lab.master_state_dir / "secrets" / "munge.key").read_bytes() == munge_key
        again = apply_slurm(lab)
        changed = {n: [f"{s['fun']} {s['name']}" for s in r["states"] if s["status"] == "changed"]
                   for n, r in again["nodes"].items()}
        assert changed == {n: [] for n in lab.nodes}, changed
    finally:
        if lab.exec(MASTER, "systemctl", "is-active", "pimaster", check=False).stdout.strip() != "active":
            # Leave the next test a master: the one in the backup, if it got that far.
            lab.exec(MASTER, "systemctl", "stop", "pimaster", check=False)
            lab.pimaster("restore", BACKUP, "--passphrase-file", PASSPHRASE, "--force", check=False)
            lab.exec(MASTER, "systemctl", "start", "pimaster", check=False)
        lab.exec(MASTER, "rm", "-f", BACKUP, PASSPHRASE, check=False)
