"""boot: the Raspberry Pi's kernel command line (cmdline.txt) and firmware settings (config.txt).

Both files live on the boot partition: ``/boot/firmware`` on bookworm, ``/boot`` before. The one
that has cmdline.txt or config.txt is used (``boot_dir`` overrides). Both take effect at the next
boot only, so a change puts ``reboot_required: true`` into the state's changes.
"""

from __future__ import annotations

import os
import re

from .base import Outcome, StateContext, StateError, Text, absolute_path, read_text, string_list, update_file

__states__ = ("cmdline", "config")

BOOT_DIRS = ("/boot/firmware", "/boot")
# Kernel parameters that are given several times, each adding a value (the stock Pi cmdline has two
# consoles; cgroup guides add cgroup_enable=cpuset and cgroup_enable=memory): never replaced.
REPEATABLE_PARAMS = {"console", "cgroup_enable", "cgroup_disable"}
# A kernel parameter: unquoted text, or "quoted text" (param="a b").
PARAM_RE = re.compile(r'(?:[^\s"]+|"[^"]*")+')
# config.txt keys that may appear many times, one per overlay / parameter: their identity is the
# key plus the overlay or parameter name (dtoverlay=w1-gpio,gpiopin=4 is the overlay w1-gpio).
MULTI_KEYS = {"dtoverlay", "dtparam", "device_tree_overlay", "device_tree_param"}


def find_boot_dir(boot_dir: str | None) -> str:
    """The boot partition's directory: boot_dir if given, else /boot/firmware or /boot."""
    if boot_dir is not None:
        path = absolute_path(boot_dir, "boot_dir")
        if not os.path.isdir(path):
            raise StateError(f"boot_dir {path} is not a directory")
        return path
    for directory in BOOT_DIRS:
        if any(os.path.isfile(os.path.join(directory, f)) for f in ("cmdline.txt", "config.txt")):
            return directory
    raise StateError("no cmdline.txt or config.txt in /boot/firmware or /boot (is this a Raspberry Pi? "
                     "boot_dir: names the boot partition's directory)")


# ---------------------------------------------------------------------------------------------
# cmdline.txt

def _param_key(param: str) -> str:
    return param.split("=", 1)[0]


def _check_params(items: list[str], what: str) -> list[str]:
    for item in items:
        if not PARAM_RE.fullmatch(item) or item.startswith("="):
            raise StateError(f"{what}: {item!r} is not one kernel parameter (no blanks, quote values with spaces)")
    return items


def cmdline(ctx: StateContext, name: str, present: Text | list[Text] | None = None,
            absent: Text | list[Text] | None = None, boot_dir: str | None = None) -> dict:
    """Kernel parameters present in or absent from cmdline.txt; the rest of the line untouched.

    cmdline.txt is one line; only the parameters named change, every other one keeps its place and
    spelling. ``present: [key=value]`` replaces the value of an existing ``key=...`` in place (and
    drops later duplicates, which would override it), or appends the parameter; a flag (``quiet``)
    is appended if missing. The kernel takes ``console``, ``cgroup_enable`` and ``cgroup_disable``
    several times, so for those the parameter is added beside the existing ones, never replacing.
    ``absent: [key]`` removes the key with any value (and the bare flag); ``absent: [key=value]``
    removes only that exact parameter. A change needs a reboot: ``reboot_required: true``.

    Arguments:
      name: an id for the state; not used otherwise.
      present: parameters to have, a list (or one string).
      absent: parameters to remove, a list (or one string).
      boot_dir: the boot partition's directory, default /boot/firmware or /boot (whichever has
        cmdline.txt).

    Example::

        cgroups-for-k3s:
          boot.cmdline:
            - present: [cgroup_memory=1, cgroup_enable=memory]
            - absent: [quiet]
    """
    wanted = _check_params(string_list(present, "present", allow_empty=False), "present")
    unwanted = _check_params(string_list(absent, "absent", allow_empty=False), "absent")
    if not wanted and not unwanted:
        raise StateError("give present and/or absent kernel parameters")
    for item in unwanted:
        clash = [p for p in wanted if p == item or ("=" not in item and _param_key(p) == item)]
        if clash:
            raise StateError(f"{clash[0]!r} is both present and absent")
    path = os.path.join(find_boot_dir(boot_dir), "cmdline.txt")
    old = read_text(path)
    if old is None:
        raise StateError(f"{path} does not exist")
    new, added, removed = edit_cmdline(old, wanted, unwanted)
    out = Outcome(ctx, name)
    changes = update_file(ctx, path, old, new)
    if changes:
        changes.update({k: v for k, v in (("added", added), ("removed", removed)) if v}, reboot_required=True)
    out.update(changes, f"change the kernel command line in {path} (takes effect after a reboot)",
               f"changed the kernel command line in {path} (takes effect after a reboot)")
    return out.result(f"{path} has the kernel parameters wanted")


def edit_cmdline(text: str, wanted: list[str], unwanted: list[str]) -> tuple[str, list[str], list[str]]:
    """cmdline.txt's text with the ``wanted`` parameters present and the ``unwanted`` absent (see
    cmdline), every other parameter and blank where it was; and the parameters added and removed."""
    first, newline, rest = text.partition("\n")
    items, tail = _split_params(first)
    added, removed = [], []

    def drop(i: int) -> None:
        removed.append(items[i][1])
        if i == 0 and len(items) > 1:
            items[1][0] = items[0][0]
        del items[i]

    for item in unwanted:
        for i in reversed(range(len(items))):
            param = items[i][1]
            if param == item or ("=" not in item and _param_key(param) == item):
                drop(i)
    for item in wanted:
        params = [p for _, p in items]
        if item in params:
            continue
        key = _param_key(item)
        same_key = [i for i, p in enumerate(params) if _param_key(p) == key]
        if "=" in item and same_key and key not in REPEATABLE_PARAMS:
            removed.append(items[same_key[0]][1])
            items[same_key[0]][1] = item
            for i in reversed(same_key[1:]):
                drop(i)
        else:
            items.append([" " if items else "", item])
        added.append(item)
    return "".join(blank + param for blank, param in items) + tail + newline + rest, added, removed


def _split_params(line: str) -> tuple[list[list[str]], str]:
    """[[blanks before, parameter], ...] and the trailing blanks: joined again, the same line.

    Blanks are kept as they were, so the line is rewritten only where a parameter changes.
    """
    items, end = [], 0
    for m in PARAM_RE.finditer(line):
        items.append([line[end:m.start()], m.group()])
        end = m.end()
    return items, line[end:]


# ---------------------------------------------------------------------------------------------
# config.txt

def _identity(body: str) -> tuple | None:
    """What a config.txt line sets: (key,) or (key, overlay/param name); None for other lines."""
    text = body.strip()
    if not text or text.startswith(("#", "[")) or "=" not in text:
        return None
    key, _, value = text.partition("=")
    key = key.strip()
    if key in MULTI_KEYS:
        return key, re.split(r"[,=]", value.strip(), maxsplit=1)[0]
    return (key,)


def _section_of(body: str) -> str | None | bool:
    """The filter a header line opens ("pi4"; None for [all]); False when the line is no header."""
    text = body.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return None if inner.lower() == "all" else inner
    return False


def config(ctx: StateContext, name: str, value: str | int | float | bool, section: str | None = None,
           boot_dir: str | None = None) -> dict:
    """A setting (name=value) in the Raspberry Pi's config.txt, optionally in a [section].

    The line for the setting is replaced in place (a commented-out ``#name=...`` line is replaced
    in place, too, keeping it next to its comment), or added. ``dtoverlay`` and ``dtparam`` lines
    are told apart by their overlay or parameter: ``name: dtoverlay, value: w1-gpio,gpiopin=4``
    owns the w1-gpio line and leaves other overlays alone; ``name: dtparam=audio, value: "on"`` and
    ``name: dtparam, value: audio=on`` are the same setting.

    Without ``section`` (or with ``all``) the setting applies to every Pi: it is looked for before
    the first [filter] line and in [all] sections, and added at the end of the file under [all]. A
    ``section`` (``pi4``, ``cm4``, ...) names a conditional [filter] section: the setting goes at the
    end of the last such section, or into a new one at the end of the file followed by [all].
    A change needs a reboot: ``reboot_required: true``.

    Arguments:
      name: the key, e.g. ``arm_64bit``, ``gpu_mem``, ``dtoverlay``, ``dtparam=audio``
        (default: the state's id).
      value: the value; YAML true/false become on/off for dtparam/dtoverlay and 1/0 otherwise
        (quote "on" to be exact).
      section: the [filter] section, e.g. ``pi4``; default: unconditional.
      boot_dir: the boot partition's directory, default /boot/firmware or /boot.

    Example::

        arm_64bit:
          boot.config:
            - value: 1
        dtparam=audio:
          boot.config:
            - value: "off"
        w1:
          boot.config:
            - name: dtoverlay
            - value: w1-gpio,gpiopin=4
            - section: pi4
    """
    if not name.strip() or re.search(r"[\s#\[\]]", name.strip()):
        raise StateError(f"{name!r} is not a config.txt key")
    name = name.strip()
    if isinstance(value, bool):
        key_word = name.split("=", 1)[0]
        value = ("on" if value else "off") if key_word in MULTI_KEYS else int(value)
    if "\n" in str(value):
        raise StateError(f"value must be one line of text or a number, not {value!r}")
    wanted_line = f"{name}={value}"
    if section is not None:
        if not section.strip("[] ") or "\n" in section:
            raise StateError(f"section must be a filter like pi4, not {section!r}")
        section = section.strip().strip("[]").strip()
        if section.lower() == "all":
            section = None

    path = os.path.join(find_boot_dir(boot_dir), "config.txt")
    old = read_text(path)
    out = Outcome(ctx, name)
    changes = update_file(ctx, path, old, set_config(old or "", wanted_line, section))
    if changes:
        changes["reboot_required"] = True
    where = f" in [{section}]" if section else ""
    out.update(changes, f"set {wanted_line}{where} in {path} (takes effect after a reboot)",
               f"set {wanted_line}{where} in {path} (takes effect after a reboot)")
    return out.result(f"{wanted_line} is set in {path}")


def set_config(text: str, wanted_line: str, section: str | None) -> str:
    """config.txt's text with the setting ``wanted_line`` ("key=value") in the [section] (None:
    unconditional): in place of the line for the same setting, or of a commented-out one, or added
    (see config)."""
    identity = _identity(wanted_line)
    lines = text.splitlines(keepends=True)
    bodies = [ln.rstrip("\r\n") for ln in lines]
    in_section: list[str | None] = []
    current = None
    for body in bodies:
        opened = _section_of(body)
        if opened is not False:
            current = opened
        in_section.append(current)

    def eol(i: int) -> str:
        return lines[i][len(bodies[i]):] or "\n"

    hits = [i for i, body in enumerate(bodies) if in_section[i] == section and _identity(body) == identity]
    if hits:
        lines[hits[0]] = wanted_line + eol(hits[0])
        for i in reversed(hits[1:]):  # a later line for the same setting would override this one
            del lines[i]
        return "".join(lines)
    commented = [i for i, body in enumerate(bodies) if in_section[i] == section
                 and body.lstrip().startswith("#") and _identity(body.lstrip().lstrip("#")) == identity]
    if commented:
        lines[commented[0]] = wanted_line + eol(commented[0])
        return "".join(lines)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    ours = [i for i, s in enumerate(in_section) if s == section and _section_of(bodies[i]) is False
            and bodies[i].strip()]
    headers = [i for i, body in enumerate(bodies) if _section_of(body) == section]
    if section is None and (not lines or in_section[-1] is None):
        lines.append(wanted_line + "\n")
    elif section is not None and headers:
        # After the last setting of the last such section (or right after its header).
        last_header = headers[-1]
        after = max([i for i in ours if i > last_header], default=last_header)
        lines.insert(after + 1, wanted_line + "\n")
    elif section is None:
        lines += ["[all]\n", wanted_line + "\n"]
    else:
        lines += [f"[{section}]\n", wanted_line + "\n", "[all]\n"]
    return "".join(lines)
