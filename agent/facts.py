"""Facts (what a node is) and health (how it is doing), read from the node itself.

Off a Pi (a PC, a lab node) the Pi-only facts are simply absent: every reader here returns
nothing rather than raising, because a missing file is the normal case somewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import socket
import time

from . import __version__
from .states.network import BACKEND_UNITS

# The firmware's device tree: /proc/device-tree is a link to /sys/firmware/devicetree/base on a Pi.
# Both are read, in this order: a container (the lab's nodes) can be given only the second.
DEVICE_TREE_DIRS = ("/proc/device-tree", "/sys/firmware/devicetree/base")
THROTTLED_SYSFS = "/sys/devices/platform/soc/soc:firmware/get_throttled"

# Bits of the firmware's throttled word (`vcgencmd get_throttled`), documented by Raspberry Pi.
THROTTLE_FLAGS = {
    0: "under-voltage",
    1: "arm-frequency-capped",
    2: "throttled",
    3: "soft-temperature-limit",
    16: "under-voltage-occurred",
    17: "arm-frequency-capped-occurred",
    18: "throttled-occurred",
    19: "soft-temperature-limit-occurred",
}


def _read(path: str, binary: bool = False) -> str | bytes | None:
    try:
        with open(path, "rb" if binary else "r") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError):
        return None


def _device_tree_string(name: str) -> str | None:
    for directory in DEVICE_TREE_DIRS:
        raw = _read(os.path.join(directory, name), binary=True)
        if raw:
            return raw.rstrip(b"\0").decode(errors="replace").strip() or None
    return None


def pi_serial() -> str | None:
    serial = _device_tree_string("serial-number")
    if serial:
        return serial
    cpuinfo = _read("/proc/cpuinfo") or ""
    for line in cpuinfo.splitlines():
        if line.startswith("Serial"):
            value = line.split(":", 1)[1].strip()
            if value.strip("0"):
                return value
    return None


def os_release() -> dict:
    info = {}
    for line in (_read("/etc/os-release") or "").splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            info[key.strip()] = value.strip().strip('"')
    return {k: info[k] for k in ("ID", "VERSION_ID", "VERSION_CODENAME", "PRETTY_NAME") if k in info}


def boot_config_dir() -> str | None:
    # Bookworm moved the boot partition to /boot/firmware; /boot/config.txt then only points there.
    for directory in ("/boot/firmware", "/boot"):
        if os.path.exists(os.path.join(directory, "config.txt")) or \
                os.path.exists(os.path.join(directory, "cmdline.txt")):
            return directory
    if os.path.isdir("/boot/firmware"):
        return "/boot/firmware"
    return None


def memory_total_mb() -> int | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return None


def memory_health() -> dict:
    """``memory_used_pct`` (what is not available to new programs) and ``memory_available_mb``,
    from /proc/meminfo; empty when it cannot be read."""
    values = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable") and rest.split():
            try:
                values[name] = int(rest.split()[0])
            except ValueError:
                return {}
    total, available = values.get("MemTotal"), values.get("MemAvailable")
    if not total or available is None:
        return {}
    return {"memory_used_pct": round(100.0 * (total - available) / total, 1),
            "memory_available_mb": available // 1024}


_which_cache: dict[str, str | None] = {}


async def _run(*argv: str, timeout: float = 5.0) -> str | None:
    if argv[0] not in _which_cache:  # looked up once: ping asks for health often
        _which_cache[argv[0]] = shutil.which(argv[0])
    if not _which_cache[argv[0]]:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    return out.decode(errors="replace").strip() if proc.returncode == 0 else None


def network_interfaces(ip_json: str | None) -> list[dict]:
    """Interfaces with MAC and addresses, from `ip -j addr` (or /sys when ip is missing)."""
    interfaces = []
    if ip_json:
        try:
            for link in json.loads(ip_json):
                if link.get("ifname") == "lo":
                    continue
                interfaces.append({
                    "name": link.get("ifname"),
                    "mac": link.get("address"),
                    "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                                  if "local" in a and a.get("scope") != "host"],
                })
            return interfaces
        except (ValueError, TypeError, KeyError, AttributeError):
            interfaces = []
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        return []
    for name in sorted(names):
        if name == "lo":
            continue
        mac = (_read(f"/sys/class/net/{name}/address") or "").strip() or None
        interfaces.append({"name": name, "mac": mac, "addresses": []})
    return interfaces


async def virtualization() -> str | None:
    """What the node runs in, as systemd-detect-virt names it: "none" on bare metal (a Pi),
    "systemd-nspawn", "docker", "kvm", ... States use it where a container cannot do what a Pi can
    (a container has no CAP_SYS_TIME, so chrony must not try to set the clock)."""
    if shutil.which("systemd-detect-virt") is None:
        return None
    # It prints "none" and exits 1 on bare metal, which _run reads as a failure.
    return await _run("systemd-detect-virt") or "none"


async def network_backend() -> str | None:
    """What manages the node's network, named as network.static's ``backend`` argument names it
    (networkmanager, dhcpcd, networkd), or "none" when none of them runs (a node that got its
    address from elsewhere: an ARM lab node, where qemu-user cannot run them). Absent without systemd."""
    if not os.path.isdir("/run/systemd/system"):
        return None
    for name, unit in BACKEND_UNITS.items():
        if await _run("systemctl", "is-active", "--quiet", unit) is not None:
            return name
    return "none"


_static_cache: dict = {}


async def gather_facts() -> dict:
    """All facts the master keeps about this node."""
    if not _static_cache:
        _static_cache["arch"] = await _run("dpkg", "--print-architecture")
        _static_cache["machine_id"] = (_read("/etc/machine-id") or "").strip() or None
        _static_cache["virtualization"] = await virtualization()
    interfaces = network_interfaces(await _run("ip", "-j", "addr", "show"))
    facts = {
        "hostname": socket.gethostname(),
        "fqdn": socket.getfqdn(),
        "machine_id": _static_cache["machine_id"],
        "pi_model": _device_tree_string("model"),
        "pi_serial": pi_serial(),
        "interfaces": interfaces,
        "macs": sorted({i["mac"] for i in interfaces if i.get("mac")}),
        "ips": [a.split("/")[0] for i in interfaces for a in i["addresses"]],
        "cpu_count": os.cpu_count(),
        "memory_mb": memory_total_mb(),
        "os": os_release(),
        "arch": _static_cache["arch"],
        "machine": platform.machine(),
        "kernel": platform.release(),
        "boot_dir": boot_config_dir(),
        "systemd": os.path.isdir("/run/systemd/system"),
        "virtualization": _static_cache["virtualization"],
        "network_backend": await network_backend(),
        "agent_version": __version__,
    }
    # Pi-only and unavailable facts are absent, not null: "not a Pi" is not an error.
    return {k: v for k, v in facts.items() if v is not None}


BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
INIT_STAT_PATH = "/proc/1/stat"
PROC_STAT_PATH = "/proc/stat"
# Test-only: a loopback test's agents are processes on one host (one kernel, one PID 1); a test that
# fakes their reboots gives each start its own boot id here. Never set on a node.
TEST_BOOT_ID_ENV = "PIAGENT_TEST_BOOT_ID"


def _init_start_ticks() -> int | None:
    """When PID 1 started, in clock ticks after the kernel booted (field 22 of /proc/1/stat; the
    command name before it may hold spaces and parentheses, so counted from its closing one)."""
    raw = _read(INIT_STAT_PATH)
    if not raw or ")" not in raw:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _kernel_boot_time() -> float | None:
    for line in (_read(PROC_STAT_PATH) or "").splitlines():
        if line.startswith("btime "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def boot_identity() -> dict:
    """Which boot of this node is running: ``boot_id`` (the kernel's random boot id, new at each
    boot of a Pi; a container may show the host's), ``boot_init`` (when PID 1 started, in ticks
    after the kernel booted: new at each boot of a container, whose kernel is the host's) and ``booted_at`` (when PID 1
    started, on this node's clock as it is now: right even on a Pi that set its clock after boot).
    `pimaster reboot` sees a node back from a reboot when (boot_id, boot_init) changed."""
    out: dict = {}
    fake = os.environ.get(TEST_BOOT_ID_ENV)
    if fake:
        return {"boot_id": fake[:64], "boot_init": 0, "booted_at": _process_started}
    boot_id = (_read(BOOT_ID_PATH) or "").strip()
    if boot_id:
        out["boot_id"] = boot_id
    ticks = _init_start_ticks()
    if ticks is not None:
        out["boot_init"] = ticks
        btime = _kernel_boot_time()
        if btime is not None:
            out["booted_at"] = round(btime + ticks / os.sysconf("SC_CLK_TCK"), 2)
    return out


_process_started = time.time()


def decode_throttled(word: int) -> list[str]:
    return [name for bit, name in THROTTLE_FLAGS.items() if word & (1 << bit)]


async def throttled() -> int | None:
    raw = _read(THROTTLED_SYSFS)
    if raw and raw.strip():
        try:
            return int(raw.strip(), 16)
        except ValueError:
            pass
    out = await _run("vcgencmd", "get_throttled", timeout=2.0)
    if out and "=" in out:
        try:
            return int(out.split("=", 1)[1], 16)
        except ValueError:
            return None
    return None


def cpu_temperature_c() -> float | None:
    raw = _read("/sys/class/thermal/thermal_zone0/temp")
    try:
        return round(int(raw.strip()) / 1000.0, 1) if raw else None
    except ValueError:
        return None


async def health() -> dict:
    """What `pimaster ping` shows per node."""
    result: dict = {"time": time.time(), **boot_identity()}
    uptime = _read("/proc/uptime")
    if uptime:
        result["uptime_s"] = round(float(uptime.split()[0]), 1)
    try:
        result["load"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    temp = cpu_temperature_c()
    if temp is not None:
        result["temp_c"] = temp
    word = await throttled()
    if word is not None:
        result["throttled"] = f"0x{word:x}"
        result["throttled_flags"] = decode_throttled(word)
    result.update(memory_health())
    try:
        st = os.statvfs("/")
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        if total:
            result["disk_root_used_pct"] = round(100.0 * (total - free) / total, 1)
            result["disk_root_free_mb"] = free // (1024 * 1024)
    except OSError:
        pass
    return result
