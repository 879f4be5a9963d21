"""Lab nodes that look like Raspberry Pis: a model and serial, a thermal zone, `vcgencmd`, a boot partition.

The agent reads these where a real Pi has them, so its Pi-only facts and health (model, serial,
temperature, throttling and under-voltage) take the same path on a lab node as on a Pi. How each
one is put in place inside a systemd-nspawn container, and why that way:

- Model and serial: a Pi's firmware hands the kernel a device tree, which the kernel shows in
  /sys/firmware/devicetree/base (``model``, ``serial-number``, ``compatible``; NUL-terminated)
  and links from /proc/device-tree. procfs takes no new entries, so /proc/device-tree cannot be
  faked; /sys/firmware can: the node gets a host directory holding ``devicetree/base/...`` bound
  read-only over /sys/firmware (it hides the VM's acpi/dmi entries there, which a Pi has not either).
  The agent reads /sys/firmware/devicetree/base after /proc/device-tree (both exist on a Pi).
- Temperature: a host directory holding ``thermal_zone0/{type,temp}`` (``cpu-thermal``, millidegrees,
  as on a Pi 4 and 5) bound read-only over /sys/class/thermal (which sysfs always has).
- Throttling: /usr/bin/vcgencmd in the node's overlay, a shell script standing in for Raspberry Pi's
  tool (which asks the VideoCore firmware): ``get_throttled`` prints ``throttled=0x50005`` from a
  host file bound read-only at NODE_CONTROL_DIR, ``measure_temp`` prints ``temp=47.0'C`` from the
  thermal zone. The firmware's sysfs file, which the agent reads first, does not exist in a node.
- Boot partition: /boot/firmware/cmdline.txt and config.txt of Raspberry Pi OS bookworm, written
  into the node's overlay before its first boot. They are the node's own files: states edit them.

The values the lab controls live on the host, in ``LAB_DIR/nodes/NAME/hardware/``, and are replaced
atomically by `pimaster lab set`: every bind is of a directory, so a replaced file shows in the
node at once, without entering it. A node keeps its model and serial for the lab's life (a
reflashed card in the same Pi keeps them too); node01 is a Pi 5, the others are Pi 4s.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from piagent.fileio import write_atomic

from .model import LabError, LabRefused, Node

# In the node, read-only from the host: the values only the firmware knows on a Pi (throttled).
NODE_CONTROL_DIR = "/opt/pimaster/lab-hardware"
VCGENCMD = "usr/bin/vcgencmd"
BOOT_DIR = "boot/firmware"
# (host subdirectory of hardware/, where it is bound in the node); sysfs ones only where the host's
# sysfs has the directory (the node's sysfs is the same kernel's), as a bind needs its mount point.
BINDS = (("firmware", "/sys/firmware"), ("thermal", "/sys/class/thermal"), ("control", NODE_CONTROL_DIR))

PI5 = {"model": "Raspberry Pi 5 Model B Rev 1.0", "compatible": ["raspberrypi,5-model-b", "brcm,bcm2712"],
       "serial_prefix": ""}
PI4 = {"model": "Raspberry Pi 4 Model B Rev 1.5", "compatible": ["raspberrypi,4-model-b", "brcm,bcm2711"],
       # A Pi 4's serial is 10000000 and 8 hex digits (/proc/cpuinfo's Serial, the device tree's serial-number).
       "serial_prefix": "10000000"}
PI5_NODES = {"node01"}

TEMP_MIN_C, TEMP_MAX_C = -40.0, 125.0       # what a Pi's SoC sensor can report
THROTTLED_MAX = 0xFFFFFFFF                  # the firmware's throttled word is 32 bits
KNOWN_SETTINGS = {
    "temp": f"°C, {TEMP_MIN_C:g} to {TEMP_MAX_C:g}: thermal_zone0, vcgencmd measure_temp",
    "throttled": "the firmware's throttled word, hex (0x50005) or decimal: vcgencmd get_throttled",
}

# Raspberry Pi OS bookworm (2023-12-05 image, as the first boot leaves it): the partition's
# disk id is new after the first boot, so each node has its own.
CMDLINE = ("console=serial0,115200 console=tty1 root=PARTUUID={disk_id}-02 rootfstype=ext4 fsck.repair=yes "
           "rootwait quiet\n")
CONFIG_TXT = """\
# For more options and information see
# http://rptl.io/configtxt
# Some settings may impact device functionality. See link above for details

# Uncomment some or all of these to enable the optional hardware interfaces
#dtparam=i2c_arm=on
#dtparam=i2s=on
#dtparam=spi=on

# Enable audio (loads snd_bcm2835)
dtparam=audio=on

# Additional overlays and parameters are documented
# /boot/firmware/overlays/README

# Automatically load overlays for detected cameras
camera_auto_detect=1

# Automatically load overlays for detected DSI displays
display_auto_detect=1

# Automatically load initramfs files, if found
auto_initramfs=1

# Enable DRM VC4 V3D driver
dtoverlay=vc4-kms-v3d
max_framebuffers=2

# Don't have the firmware create an initial video= setting in cmdline.txt.
# Use the kernel's default instead.
disable_fw_kms_setup=1

# Run in 64-bit mode
arm_64bit=1

# Disable compensation for displays with overscan
disable_overscan=1

[cm4]
# Enable host mode on the 2711 built-in XHCI USB controller.
# This line should be removed if the legacy DWC2 controller is required
# (e.g. for USB device mode) or if USB support is not required.
otg_mode=1

[all]

[pi4]
# Run as fast as firmware / board allows
arm_boost=1

[all]
"""

VCGENCMD_SCRIPT = f"""#!/bin/sh
# Written by `pimaster lab`: a stand-in for Raspberry Pi's vcgencmd, which asks the VideoCore
# firmware (this node has none). Its values are the lab's: `pimaster lab set NODE temp=.. throttled=..`.
case "$1" in
get_throttled)
    read -r word < {NODE_CONTROL_DIR}/throttled || exit 1
    echo "throttled=$word" ;;
measure_temp)
    read -r milli < /sys/class/thermal/thermal_zone0/temp || exit 1
    awk -v m="$milli" 'BEGIN {{ printf "temp=%.1f\\047C\\n", m / 1000 }}' ;;
"")
    echo "usage: vcgencmd get_throttled | measure_temp  (the pimaster lab's stand-in)" >&2
    exit 1 ;;
*)
    echo 'error=2 error_msg="Command not registered"'
    exit 1 ;;
esac
"""


def hardware_dir(node: Node) -> Path:
    return node.dir / "hardware"


def _node_number(node: Node) -> int:
    digits = re.sub(r"\D", "", node.name)
    return int(digits) % 256 if digits else int.from_bytes(os.urandom(1), "big")


def _device_tree(kind: dict, serial: str) -> dict[str, bytes]:
    return {"model": kind["model"].encode() + b"\0", "serial-number": serial.encode() + b"\0",
            "compatible": b"".join(c.encode() + b"\0" for c in kind["compatible"])}


def default_temp_c(node: Node) -> float:
    """An idle Pi's temperature, a little different per node so that the lab's `ping` is not uniform."""
    return 44.0 + 1.5 * ((_node_number(node) - 1) % 4)


def create_hardware(node: Node) -> None:
    """The node's Pi on the host (model, serial, thermal zone, throttled word), once per lab: a node
    that has one (booted before, or reflashed) keeps it."""
    hw = hardware_dir(node)
    if (hw / "firmware").is_dir():
        return
    kind = PI5 if node.name in PI5_NODES else PI4
    # Random per lab, and unique within it: the last two digits are the node's number.
    random_hex = os.urandom(8).hex()[: 14 - len(kind["serial_prefix"])]
    serial = kind["serial_prefix"] + random_hex + f"{_node_number(node):02x}"
    base = hw / "firmware" / "devicetree" / "base"
    base.mkdir(parents=True, exist_ok=True)
    for name, data in _device_tree(kind, serial).items():
        write_atomic(str(base / name), data, 0o444)
    zone = hw / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True, exist_ok=True)
    write_atomic(str(zone / "type"), "cpu-thermal\n", 0o444)
    write_atomic(str(zone / "temp"), f"{round(default_temp_c(node) * 1000)}\n", 0o444)
    (hw / "control").mkdir(exist_ok=True)
    write_atomic(str(hw / "control" / "throttled"), "0x0\n", 0o444)


def prepare_pi(node: Node, root: Path, write_file) -> None:
    """Before a first boot: the node's Pi on the host, and in its overlay (``root``, mounted) the
    vcgencmd stand-in, the boot partition's files and the mount points of the binds."""
    create_hardware(node)
    write_file(root / VCGENCMD, VCGENCMD_SCRIPT, 0o755)
    write_file(root / BOOT_DIR / "cmdline.txt", CMDLINE.format(disk_id=os.urandom(4).hex()))
    write_file(root / BOOT_DIR / "config.txt", CONFIG_TXT)
    (root / NODE_CONTROL_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)


def nspawn_binds(node: Node) -> list[str]:
    """nspawn arguments binding the node's Pi hardware (read-only); none for a node without one."""
    hw = hardware_dir(node)
    return [f"--bind-ro={hw / sub}:{inside}" for sub, inside in BINDS
            if (hw / sub).is_dir() and (not inside.startswith("/sys/") or os.path.isdir(inside))]


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """KEY=VALUE words -> the files' new contents (key -> text); LabRefused for anything else."""
    known = "; ".join(f"{k}= ({v})" for k, v in KNOWN_SETTINGS.items())
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in KNOWN_SETTINGS:
            raise LabRefused(f"{pair!r} is not a known setting; known: {known}")
        if not value:
            raise LabRefused(f"{key}= needs a value: {KNOWN_SETTINGS[key]}")
        if key == "temp":
            settings[key] = _temp_millidegrees(value)
        else:
            settings[key] = _throttled_word(value)
    return settings


def _temp_millidegrees(value: str) -> str:
    try:
        celsius = float(value.removesuffix("C").removesuffix("°"))
    except ValueError:
        celsius = math.nan
    if not TEMP_MIN_C <= celsius <= TEMP_MAX_C:  # NaN fails this too
        raise LabRefused(f"temp={value} is not a temperature from {TEMP_MIN_C:g} to {TEMP_MAX_C:g} °C")
    return f"{round(celsius * 1000)}\n"


def _throttled_word(value: str) -> str:
    try:
        word = int(value, 16) if value.lower().startswith("0x") else int(value, 10)
    except ValueError:
        word = -1
    if not 0 <= word <= THROTTLED_MAX:
        raise LabRefused(f"throttled={value} is not a 32-bit word, hex (0x50005) or decimal (327685)")
    return f"0x{word:x}\n"


def set_values(node: Node, settings: dict[str, str]) -> None:
    """Replace the node's control files (atomically: the agent reads them at any moment)."""
    hw = hardware_dir(node)
    if not (hw / "firmware").is_dir():
        raise LabError(f"{node.name} has no Pi hardware (a lab from before `lab set` existed): "
                       f"`pimaster lab down` and `up` gives it one")
    paths = {"temp": hw / "thermal" / "thermal_zone0" / "temp", "throttled": hw / "control" / "throttled"}
    try:
        for key, text in settings.items():
            write_atomic(str(paths[key]), text, 0o444)
    except OSError as exc:
        raise LabError(f"{node.name}: cannot write {exc.filename}: {exc.strerror}") from None


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().rstrip(b"\0\n").decode(errors="replace")
    except OSError:
        return None


def pi_status(node: Node) -> dict:
    """The node's Pi as the lab set it (empty: a node without one): model, serial, temp_c, throttled."""
    hw = hardware_dir(node)
    base = hw / "firmware" / "devicetree" / "base"
    info: dict = {}
    for key, path in (("model", base / "model"), ("serial", base / "serial-number"),
                      ("throttled", hw / "control" / "throttled")):
        value = _read(path)
        if value is not None:
            info[key] = value
    milli = _read(hw / "thermal" / "thermal_zone0" / "temp")
    if milli is not None and milli.lstrip("-").isdigit():
        info["temp_c"] = int(milli) / 1000
    return info
