"""State modules on real systems: apt, systemd, hostnames, mounts, sysctl, swap, inside lab nodes.

Each test runs `piagent state ...` (this repo's live source) in a node, the way a person does on a
Pi, and checks the node itself -- dpkg, systemctl, /proc, the files -- not just the reported
result. For every module: a test-mode run reports the change and makes none, a real run makes it,
a second run reports no changes.

The nodes are shared with the other e2e tests (node01 runs the master): these tests use node03 and
node04 and put back what they change (hostname, fstab, packages, units, sysctl values).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab_harness import describe

pytestmark = pytest.mark.lab

NODE = "node03"


def state(lab, node: str, fun: str, *args: str, test: bool = False) -> dict:
    """`piagent state FUN ARGS --json [--test]` in the node: the result as the engine reports it."""
    result = lab.exec(node, "piagent", "state", fun, *args, "--json", *(["--test"] if test else []),
                      check=False, timeout=300)
    try:
        res = json.loads(result.stdout)
    except ValueError:
        raise AssertionError(f"piagent state {fun} printed no JSON: {describe(result)}") from None
    assert result.returncode == (1 if res["status"] == "failed" else 0), describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    return res


def sh(lab, node: str, script: str, check: bool = True) -> str:
    return lab.exec(node, "sh", "-c", script, check=check).stdout


def cycle(lab, node: str, fun: str, *args: str, before, after) -> tuple[dict, dict]:
    """Test mode reports a change without making it; a real run makes it; a second run changes nothing."""
    would = state(lab, node, fun, *args, test=True)
    assert would["status"] == "changed" and would["result"] is None and would["changes"], would
    before()
    done = state(lab, node, fun, *args)
    assert done["status"] == "changed" and done["result"] is True, done
    after()
    again = state(lab, node, fun, *args)
    assert again["status"] == "ok" and again["changes"] == {}, again
    after()
    return would, done


def check(condition: bool, what: str) -> None:
    assert condition, what


# ---------------------------------------------------------------------------------------------
# pkg: real apt inside a node, offline, from the host's package cache

def dpkg_status(lab, package: str) -> str:
    return sh(lab, NODE, f"dpkg-query -W -f='${{Status}}' {package} 2>/dev/null", check=False)


def test_pkg_installed_held_and_removed(lab):
    package = "ntpsec-ntpdate"
    sh(lab, NODE, f"apt-get purge -y -q {package} >/dev/null 2>&1", check=False)
    try:
        would, done = cycle(lab, NODE, "pkg.installed", f"name={package}",
                            before=lambda: check("ok installed" not in dpkg_status(lab, package), "installed in test mode"),
                            after=lambda: check(dpkg_status(lab, package) == "install ok installed"
                                                and "/usr/sbin/ntpdate" in sh(lab, NODE, "command -v ntpdate"),
                                                "not installed"))
        version = sh(lab, NODE, f"dpkg-query -W -f='${{Version}}' {package}")
        assert would["changes"]["installed"][package] == {"old": None, "new": version}
        assert done["changes"]["installed"][package] == {"old": None, "new": version}

        cycle(lab, NODE, "pkg.held", f"name={package}",
              before=lambda: check(package not in sh(lab, NODE, "apt-mark showhold"), "held in test mode"),
              after=lambda: check(package in sh(lab, NODE, "apt-mark showhold").split(), "not held"))
        released = state(lab, NODE, "pkg.installed", f"name={package}", "hold=false")
        assert released["changes"] == {"unheld": [package]}
        assert package not in sh(lab, NODE, "apt-mark showhold")

        cycle(lab, NODE, "pkg.removed", f"name={package}",
              before=lambda: check(dpkg_status(lab, package) == "install ok installed", "removed in test mode"),
              after=lambda: check("ok installed" not in dpkg_status(lab, package), "still installed"))
    finally:
        sh(lab, NODE, f"apt-mark unhold {package} >/dev/null; apt-get purge -y -q {package} >/dev/null 2>&1",
           check=False)


def test_pkg_unknown_package_refreshes_lists_once_then_fails_clearly(lab):
    res = state(lab, NODE, "pkg.installed", "name=pimaster-no-such-package")
    assert res["status"] == "failed"
    assert "Unable to locate package pimaster-no-such-package" in res["comment"]
    # Not found: the lists were refreshed (which fails offline, and says so) before giving up.
    assert "apt-get update (a package was not found)" in res["comment"]
    assert "pimaster-no-such-package" not in dpkg_status(lab, "pimaster-no-such-package")


# ---------------------------------------------------------------------------------------------
# service: real systemd units in a node

UNIT = "pm-sleeper"
UNIT_FILE = f"/etc/systemd/system/{UNIT}.service"
UNIT_TEXT = """[Unit]
Description=pimaster state module test
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""
# The engine with a `watch` requisite, as a job from the master would run it.
WATCH_JOB = """
import json, sys
sys.path.insert(0, "/opt/pimaster/lib")
from piagent.engine import run_states
states = [
    {"id": "conf", "fun": "file.managed", "name": "/etc/pm-sleeper.conf", "args": {"contents": sys.argv[1]}},
    {"id": "pm-sleeper", "fun": "service.running", "name": "pm-sleeper", "args": {}, "watch": [0]},
]
print(json.dumps(run_states(states, test="--test" in sys.argv), default=str))
"""


def unit_state(lab) -> tuple[str, str, str]:
    active = sh(lab, NODE, f"systemctl is-active {UNIT}", check=False).strip()
    enabled = sh(lab, NODE, f"systemctl is-enabled {UNIT}", check=False).strip()
    pid = sh(lab, NODE, f"systemctl show -p MainPID --value {UNIT}", check=False).strip()
    return active, enabled, pid


def watch_job(lab, contents: str, test: bool = False) -> list[dict]:
    out = lab.exec(NODE, "python3", "-c", WATCH_JOB, contents, *(["--test"] if test else [])).stdout
    return json.loads(out)


def test_service_running_restarts_on_watch_and_dead(lab):
    try:
        # Test mode before a package (here: a file) brings the unit: not a failure, a forecast.
        would = state(lab, NODE, "service.running", f"name={UNIT}", test=True)
        assert would["result"] is None and "unit not present yet" in would["comment"]
        missing = state(lab, NODE, "service.running", f"name={UNIT}")
        assert missing["status"] == "failed" and f"no unit {UNIT}" in missing["comment"]

        assert state(lab, NODE, "file.managed", f"name={UNIT_FILE}", f"contents={UNIT_TEXT}")["result"] is True
        _, done = cycle(lab, NODE, "service.running", f"name={UNIT}", "enable=true",
                        before=lambda: check(unit_state(lab)[:2] == ("inactive", "disabled"), "started in test mode"),
                        after=lambda: check(unit_state(lab)[:2] == ("active", "enabled"), "not running"))
        assert done["changes"] == {"started": True, "enabled": True}

        # A watched file changes: the running service restarts (a new main process); test mode says it would.
        pid = unit_state(lab)[2]
        conf, service = watch_job(lab, "v1")
        assert conf["status"] == "changed" and service["changes"] == {"restarted": True}, service
        restarted_pid = unit_state(lab)[2]
        assert restarted_pid != pid and unit_state(lab)[0] == "active"
        conf, service = watch_job(lab, "v1")
        assert conf["status"] == "ok" and service["status"] == "ok" and unit_state(lab)[2] == restarted_pid
        conf, service = watch_job(lab, "v2", test=True)
        assert service["result"] is None and service["changes"] == {"restarted": True}
        assert unit_state(lab)[2] == restarted_pid, "test mode restarted the service"

        cycle(lab, NODE, "service.dead", f"name={UNIT}", "enable=false",
              before=lambda: check(unit_state(lab)[:2] == ("active", "enabled"), "stopped in test mode"),
              after=lambda: check(unit_state(lab)[:2] == ("inactive", "disabled"), "still running"))
        cycle(lab, NODE, "service.enabled", f"name={UNIT}",
              before=lambda: check(unit_state(lab)[1] == "disabled", "enabled in test mode"),
              after=lambda: check(unit_state(lab)[:2] == ("inactive", "enabled"), "not enabled (or started)"))
        cycle(lab, NODE, "service.disabled", f"name={UNIT}",
              before=lambda: check(unit_state(lab)[1] == "enabled", "disabled in test mode"),
              after=lambda: check(unit_state(lab)[1] == "disabled", "not disabled"))
    finally:
        sh(lab, NODE, f"systemctl disable --now {UNIT} 2>/dev/null; rm -f {UNIT_FILE} /etc/pm-sleeper.conf; "
                      "systemctl daemon-reload", check=False)


def test_service_running_fails_for_a_daemon_that_dies_just_after_starting(lab):
    """A daemon that reads a bad config and exits half a second after `systemctl start` returned
    (slurmd does; under qemu-user, later still) is reported failed, with its last words, not started."""
    unit_file = "/etc/systemd/system/pm-dies.service"
    try:
        assert state(lab, NODE, "file.managed", f"name={unit_file}",
                     "contents=[Service]\nExecStart=/bin/sh -c 'sleep 0.5; echo bad config line 3 >&2; exit 1'\n"
                     )["result"] is True
        res = state(lab, NODE, "service.running", "name=pm-dies")
        assert res["status"] == "failed", res
        assert "pm-dies.service stopped within 2 s of its start" in res["comment"], res["comment"]
        assert "bad config line 3" in res["comment"], res["comment"]
    finally:
        sh(lab, NODE, f"systemctl stop pm-dies 2>/dev/null; systemctl reset-failed pm-dies 2>/dev/null; "
                      f"rm -f {unit_file}; systemctl daemon-reload", check=False)


# ---------------------------------------------------------------------------------------------
# cmd

def test_cmd_run_creates(lab):
    marker = "/var/tmp/pm-cmd-made"
    sh(lab, NODE, f"rm -f {marker}")
    try:
        _, done = cycle(lab, NODE, "cmd.run", f"name=hostname; touch {marker}", f"creates={marker}",
                        before=lambda: check(lab.exec(NODE, "test", "-e", marker, check=False).returncode != 0,
                                             "ran in test mode"),
                        after=lambda: check(lab.exec(NODE, "test", "-e", marker, check=False).returncode == 0,
                                            "did not run"))
        assert done["changes"]["stdout"] == f"{NODE}\n" and done["changes"]["retcode"] == 0
    finally:
        sh(lab, NODE, f"rm -f {marker}")


# ---------------------------------------------------------------------------------------------
# host: the hostname (via hostnamectl under systemd) and /etc/hosts

def test_hostname_changes_now_for_boot_and_in_hosts_then_back(lab):
    node, temporary = "node04", "pmtest04"

    def names() -> list[str]:
        return sh(lab, node, "hostname; cat /etc/hostname; hostnamectl --static; "
                             "awk '$1 == \"127.0.1.1\" {print $2}' /etc/hosts").split()

    assert names() == [node] * 4
    try:
        would, _ = cycle(lab, node, "host.hostname", f"name={temporary}",
                         before=lambda: check(names() == [node] * 4, "renamed in test mode"),
                         after=lambda: check(names() == [temporary] * 4, f"not renamed: {names()}"))
        assert would["changes"]["hostname"] == {"old": node, "new": temporary}
        assert f"-127.0.1.1\t{node}\n+127.0.1.1\t{temporary}\n" in would["changes"]["diff"]
    finally:
        back = state(lab, node, "host.hostname", f"name={node}")
        assert back["result"] is True and names() == [node] * 4, back


def test_hosts_entries(lab):
    node = "node04"
    original = sh(lab, node, "cat /etc/hosts")
    try:
        cycle(lab, node, "host.present", "name=pm-extra", "ip=10.77.0.250",
              before=lambda: check(sh(lab, node, "cat /etc/hosts") == original, "written in test mode"),
              after=lambda: check(sh(lab, node, "getent hosts pm-extra").split() == ["10.77.0.250", "pm-extra"],
                                  "pm-extra does not resolve"))
        cycle(lab, node, "host.absent", "name=pm-extra",
              before=lambda: check("pm-extra" in sh(lab, node, "cat /etc/hosts"), "removed in test mode"),
              after=lambda: check(sh(lab, node, "cat /etc/hosts") == original, "not back to the original"))
    finally:
        lab.exec(node, "sh", "-c", "cat > /etc/hosts", input=original)


# ---------------------------------------------------------------------------------------------
# sysctl: /proc/sys and /etc/sysctl.d

def test_sysctl_present_now_and_for_boot(lab):
    key, proc = "net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"
    config = "/etc/sysctl.d/99-pimaster.conf"
    host_value = Path(proc).read_text()
    assert sh(lab, NODE, f"cat {proc}").strip() == "0"
    # nspawn mounts /proc/sys read-only: the module says so instead of pretending.
    read_only = state(lab, NODE, "sysctl.present", f"name={key}", "value=1")
    assert read_only["status"] == "failed" and "Read-only file system" in read_only["comment"]
    assert lab.exec(NODE, "test", "-e", config, check=False).returncode != 0, "config written despite the failure"
    # The node's own network namespace's settings made writable, as nspawn does for private networks.
    sh(lab, NODE, "mount --bind /proc/sys/net /proc/sys/net && mount -o remount,bind,rw /proc/sys/net")
    try:
        would, done = cycle(lab, NODE, "sysctl.present", f"name={key}", "value=1",
                            before=lambda: check(sh(lab, NODE, f"cat {proc}").strip() == "0", "set in test mode"),
                            after=lambda: check(sh(lab, NODE, f"cat {proc}").strip() == "1"
                                                and f"\n{key} = 1\n" in sh(lab, NODE, f"cat {config}"), "not set"))
        assert would["changes"]["value"] == done["changes"]["value"] == {"old": "0", "new": "1"}
        assert f"+{key} = 1" in would["changes"]["diff"]
        # systemd-sysctl, which applies sysctl.d at boot, reads the file.
        assert f"{key} = 1" in sh(lab, NODE, "/lib/systemd/systemd-sysctl --cat-config")
        assert Path(proc).read_text() == host_value, "the host's setting changed"
    finally:
        sh(lab, NODE, f"echo 0 > {proc}; umount /proc/sys/net; rm -f {config}", check=False)


# ---------------------------------------------------------------------------------------------
# mount: tmpfs and bind mounts (kernel NFS cannot run in the lab; its fstab part is tested locally)

def findmnt(lab, path: str) -> str:
    """ "FSTYPE SOURCE" of what is mounted on path, "" if nothing."""
    return " ".join(sh(lab, NODE, f"findmnt -n -o FSTYPE,SOURCE {path}", check=False).split())


def test_mount_mounted_and_unmounted(lab):
    tmpfs, bind, source = "/mnt/pm-tmpfs", "/mnt/pm-bind", "/srv/pm-bind-src"
    fstab = sh(lab, NODE, "cat /etc/fstab")
    entry = f"tmpfs {tmpfs} tmpfs size=1m,mode=0755 0 0\n"
    try:
        cycle(lab, NODE, "mount.mounted", f"name={tmpfs}", "device=tmpfs", "fstype=tmpfs", "opts=size=1m,mode=0755",
              "mkmnt=true",
              before=lambda: check(findmnt(lab, tmpfs) == "" and sh(lab, NODE, "cat /etc/fstab") == fstab,
                                   "mounted in test mode"),
              after=lambda: check(findmnt(lab, tmpfs) == "tmpfs tmpfs"
                                  and sh(lab, NODE, "cat /etc/fstab") == fstab + entry, "not mounted"))
        # Another file system type wanted there: a clear failure that changes nothing.
        clash = state(lab, NODE, "mount.mounted", f"name={tmpfs}", "device=/dev/sda9", "fstype=ext4")
        assert clash["status"] == "failed" and "has a tmpfs file system mounted" in clash["comment"]
        assert sh(lab, NODE, "cat /etc/fstab") == fstab + entry

        sh(lab, NODE, f"mkdir -p {source} && echo shared > {source}/file")
        cycle(lab, NODE, "mount.mounted", f"name={bind}", f"device={source}", "fstype=none", "opts=bind",
              "mkmnt=true", "persist=false",
              before=lambda: check(findmnt(lab, bind) == "", "mounted in test mode"),
              after=lambda: check(sh(lab, NODE, f"cat {bind}/file") == "shared\n"
                                  and sh(lab, NODE, "cat /etc/fstab") == fstab + entry, "bind mount missing"))

        cycle(lab, NODE, "mount.unmounted", f"name={tmpfs}", "persist=true",
              before=lambda: check(findmnt(lab, tmpfs) != "", "unmounted in test mode"),
              after=lambda: check(findmnt(lab, tmpfs) == "" and sh(lab, NODE, "cat /etc/fstab") == fstab,
                                  "still mounted or in fstab"))
        cycle(lab, NODE, "mount.unmounted", f"name={bind}",
              before=lambda: check(findmnt(lab, bind) != "", "unmounted in test mode"),
              after=lambda: check(findmnt(lab, bind) == "", "still mounted"))
    finally:
        sh(lab, NODE, f"umount {tmpfs} 2>/dev/null; umount {bind} 2>/dev/null; rm -rf {source}; "
                      f"rmdir {tmpfs} {bind} 2>/dev/null", check=False)
        lab.exec(NODE, "sh", "-c", "cat > /etc/fstab", input=fstab)


# ---------------------------------------------------------------------------------------------
# boot: cmdline.txt and config.txt on the node's /boot/firmware, found without boot_dir

CMDLINE = "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 fsck.repair=yes rootwait quiet\n"
CONFIG = "# Enable audio (loads snd_bcm2835)\ndtparam=audio=on\ndtoverlay=vc4-kms-v3d\n\n[pi4]\narm_boost=1\n\n[all]\n"


def test_boot_cmdline_and_config_in_boot_firmware(lab):
    cmdline, config = "/boot/firmware/cmdline.txt", "/boot/firmware/config.txt"
    with lab.keep_files(NODE, cmdline, config):  # the lab's own bookworm files come back afterwards
        boot_cmdline_and_config(lab, cmdline, config)


def boot_cmdline_and_config(lab, cmdline: str, config: str) -> None:
    lab.exec(NODE, "sh", "-c", f"cat > {cmdline}", input=CMDLINE)
    lab.exec(NODE, "sh", "-c", f"cat > {config}", input=CONFIG)
    would, done = cycle(lab, NODE, "boot.cmdline", "name=k3s", 'present=["cgroup_memory=1", "cgroup_enable=memory"]',
                        'absent=["quiet"]',
                        before=lambda: check(sh(lab, NODE, f"cat {cmdline}") == CMDLINE, "changed in test mode"),
                        after=lambda: check(sh(lab, NODE, f"cat {cmdline}") == CMDLINE.replace(
                            " quiet\n", " cgroup_memory=1 cgroup_enable=memory\n"), "not changed"))
    assert would["changes"]["reboot_required"] is done["changes"]["reboot_required"] is True
    would, done = cycle(lab, NODE, "boot.config", "name=dtparam=audio", "value=off",
                        before=lambda: check(sh(lab, NODE, f"cat {config}") == CONFIG, "changed in test mode"),
                        after=lambda: check(sh(lab, NODE, f"cat {config}") == CONFIG.replace(
                            "audio=on", "audio=off"), "not changed"))
    assert done["changes"]["reboot_required"] is True and "+dtparam=audio=off" in would["changes"]["diff"]


# ---------------------------------------------------------------------------------------------
# kmod: the lab kernel has no loadable modules (booted `nomodule`); built-in ones count as loaded

def test_kmod_loaded_builtin_and_persisted(lab):
    conf = "/etc/modules-load.d/pimaster.conf"
    assert lab.exec(NODE, "test", "-d", "/sys/module/overlay").returncode == 0
    try:
        would, _ = cycle(lab, NODE, "kmod.loaded", "name=overlay",
                         before=lambda: check(lab.exec(NODE, "test", "-e", conf, check=False).returncode != 0,
                                              "written in test mode"),
                         after=lambda: check("\noverlay\n" in sh(lab, NODE, f"cat {conf}"), "not persisted"))
        assert "loaded" not in would["changes"], "a built-in module needs no modprobe"
        # A module that cannot be loaded: an honest failure, and nothing persisted for it.
        failed = state(lab, NODE, "kmod.loaded", "name=pimaster_no_such_module")
        assert failed["status"] == "failed" and "pimaster_no_such_module" in failed["comment"]
        assert "modprobe" in failed["comment"]
        assert "pimaster_no_such_module" not in sh(lab, NODE, f"cat {conf}")
    finally:
        sh(lab, NODE, f"rm -f {conf}")


# ---------------------------------------------------------------------------------------------
# swap: dphys-swapfile (Raspberry Pi OS's swap file service) and fstab swap entries

def test_swap_off_disables_dphys_swapfile_and_fstab_swap(lab):
    host_swaps = Path("/proc/swaps").read_text()
    if len(host_swaps.splitlines()) > 1:
        # /proc/swaps is host-global: a test must never turn off the host's swap.
        pytest.skip("this machine has active swap, which swap.off in a node would see")
    fstab = sh(lab, NODE, "cat /etc/fstab")
    # A 1 MB swap file: installing dphys-swapfile starts it, which makes the file (swapon itself
    # is refused in a node). The package keeps this existing config (--force-confold).
    sh(lab, NODE, "printf 'CONF_SWAPSIZE=1\\n' > /etc/dphys-swapfile; "
                  "printf '/dev/pm-fake-swap none swap sw 0 0\\n' >> /etc/fstab")
    try:
        assert state(lab, NODE, "pkg.installed", "name=dphys-swapfile")["result"] is True

        def untouched():
            check(sh(lab, NODE, "systemctl is-enabled dphys-swapfile", check=False).strip() == "enabled"
                  and lab.exec(NODE, "test", "-f", "/var/swap", check=False).returncode == 0
                  and "\n/dev/pm-fake-swap none swap sw 0 0\n" in sh(lab, NODE, "cat /etc/fstab")
                  and sh(lab, NODE, "cat /etc/dphys-swapfile") == "CONF_SWAPSIZE=1\n", "changed in test mode")

        def off():
            check(sh(lab, NODE, "systemctl is-enabled dphys-swapfile", check=False).strip() == "disabled"
                  and sh(lab, NODE, "systemctl is-active dphys-swapfile", check=False).strip() != "active"
                  and lab.exec(NODE, "test", "-e", "/var/swap", check=False).returncode != 0
                  and "\n#/dev/pm-fake-swap none swap sw 0 0\n" in sh(lab, NODE, "cat /etc/fstab")
                  and sh(lab, NODE, "cat /etc/dphys-swapfile") == "CONF_SWAPSIZE=0\n", "swap not off")

        would, done = cycle(lab, NODE, "swap.off", "name=no-swap", before=untouched, after=off)
        for res in (would, done):
            assert res["changes"]["dphys-swapfile"] == {"enabled": False}
            assert res["changes"]["removed"] == "/var/swap"
            assert "swapoff" not in res["changes"], "no swap was active"
        assert Path("/proc/swaps").read_text() == host_swaps
    finally:
        sh(lab, NODE, "apt-get purge -y -q dphys-swapfile >/dev/null 2>&1; rm -f /var/swap /etc/dphys-swapfile",
           check=False)
        lab.exec(NODE, "sh", "-c", "cat > /etc/fstab", input=fstab)
