"""host: the node's hostname, and name entries in /etc/hosts.

/etc/hosts is edited line by line: lines this state has no business with stay byte for byte.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from .base import (Outcome, StateContext, StateError, absolute_path, read_text, string_list, systemd_running,
                   update_file, write_atomic)

__states__ = ("hostname", "present", "absent")

HOSTS_FILE = "/etc/hosts"
HOSTNAME_FILE = "/etc/hostname"
# Debian and Raspberry Pi OS name the host on this address when it has no fixed one.
LOOPBACK_HOST_IP = "127.0.1.1"
LABEL_RE = re.compile(r"\A[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
HOSTS_NAME_RE = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?\Z")


def _check_hostname(name: str) -> str:
    if not name:
        raise StateError("name must be the hostname")
    if len(name) > 64 or not all(LABEL_RE.match(label) for label in name.split(".")):
        raise StateError(f"{name!r} is not a valid hostname: lowercase letters, digits and '-' "
                         f"(not at either end), at most 64 characters")
    return name


def _check_host_names(names: list[str]) -> list[str]:
    for host in names:
        if not HOSTS_NAME_RE.match(host):
            raise StateError(f"{host!r} is not a host name for /etc/hosts")
    return names


def _check_ips(ips: list[str]) -> list[str]:
    checked = []
    for ip in ips:
        try:
            checked.append(str(ipaddress.ip_address(ip.strip())))
        except ValueError:
            raise StateError(f"{ip!r} is not an IP address") from None
    return checked


class _HostsLine:
    """One line of a hosts file: address, names and comment; rebuilt only when its names change."""

    def __init__(self, text: str) -> None:
        self.text = text
        body = text.rstrip("\r\n")
        self.eol = text[len(body):]
        self.body, hash_, comment = body.partition("#")
        self.comment = hash_ + comment
        fields = self.body.split()
        self.ip = fields[0] if fields else None
        try:
            self.ip_key = str(ipaddress.ip_address(self.ip)) if self.ip else None
        except ValueError:
            self.ip_key = None  # not an address line: left alone
        self.names = fields[1:]

    def has(self, host: str) -> bool:
        return host.lower() in (n.lower() for n in self.names)

    def with_names(self, names: list[str]) -> str | None:
        """The line with these names (None: the line goes), keeping address spacing and comment."""
        if not names:
            return None
        lead = self.body[:len(self.body) - len(self.body.lstrip())]
        gap = re.match(r"\S+(\s+)", self.body.lstrip())
        sep = gap.group(1) if gap else "\t"
        before_comment = self.body[len(self.body.rstrip()):] or " "
        tail = before_comment + self.comment if self.comment else ""
        return f"{lead}{self.ip}{sep}{' '.join(names)}{tail}{self.eol or chr(10)}"


def _hosts_lines(path: str, old: str | None) -> list[_HostsLine]:
    if old is None:
        raise StateError(f"{path} does not exist")
    return [_HostsLine(text) for text in old.splitlines(keepends=True)]


def _join(lines: list[_HostsLine | str]) -> str:
    return "".join(ln.text if isinstance(ln, _HostsLine) else ln for ln in lines)


def _append(lines: list, text: str) -> None:
    if lines:
        last = lines[-1]
        last_text = last.text if isinstance(last, _HostsLine) else last
        if not last_text.endswith("\n"):
            lines[-1] = last_text + "\n"
    lines.append(text)


def present(ctx: StateContext, name: str, ip: str | list[str], clean: bool = False,
            hosts_file: str = HOSTS_FILE) -> dict:
    """A name on the line of an address (or of each of several) in /etc/hosts.

    A name missing from an existing line for the address is added to that line; without such a
    line, ``IP<TAB>NAME`` is appended. Other lines stay as they are.

    Arguments:
      name: the host name (default: the state's id).
      ip: the address, or a list of addresses.
      clean: also remove the name from lines of other addresses (a node that moved), default false
        as in Salt.
      hosts_file: the file to edit, default /etc/hosts.

    Example::

        node02:
          host.present:
            - ip: 10.0.0.12
            - clean: true
    """
    path = absolute_path(hosts_file, "hosts_file")
    (host,) = _check_host_names([name])
    ips = _check_ips(string_list(ip, "ip", allow_empty=False))
    if not ips:
        raise StateError("ip must name at least one address")
    old = read_text(path)
    new = hosts_with(_hosts_lines(path, old), host, ips, clean)
    out = Outcome(ctx, name)
    out.update(update_file(ctx, path, old, new), f"put {host} on {', '.join(ips)} in {path}",
               f"put {host} on {', '.join(ips)} in {path}")
    return out.result(f"{host} is on {', '.join(ips)} in {path}")


def hosts_with(lines: list, host: str, ips: list[str], clean: bool) -> str:
    """A hosts file's text (its lines, parsed) with ``host`` on each address's line; with
    ``clean``, off the lines of other addresses."""
    for address in ips:
        same_ip = [i for i, ln in enumerate(lines) if isinstance(ln, _HostsLine) and ln.ip_key == address]
        if any(lines[i].has(host) for i in same_ip):
            continue
        if same_ip:
            first = lines[same_ip[0]]
            lines[same_ip[0]] = _HostsLine(first.with_names(first.names + [host]))
        else:
            _append(lines, f"{address}\t{host}\n")
    if clean:
        for i, ln in enumerate(lines):
            if isinstance(ln, _HostsLine) and ln.ip_key and ln.ip_key not in ips and ln.has(host):
                lines[i] = ln.with_names([n for n in ln.names if n.lower() != host.lower()]) or ""
    return _join(lines)


def absent(ctx: StateContext, name: str, ip: str | list[str] | None = None, hosts_file: str = HOSTS_FILE) -> dict:
    """A name not in /etc/hosts (on any address, or on the given ones); emptied lines go.

    Arguments:
      name: the host name (default: the state's id).
      ip: an address or list of addresses to remove the name from; default: every address.
      hosts_file: the file to edit, default /etc/hosts.

    Example::

        oldnode:
          host.absent
    """
    path = absolute_path(hosts_file, "hosts_file")
    (host,) = _check_host_names([name])
    ips = _check_ips(string_list(ip, "ip", allow_empty=False)) if ip is not None else None
    out = Outcome(ctx, name)
    old = read_text(path)
    if old is None:
        return out.result(f"{path} does not exist")
    lines: list = _hosts_lines(path, old)
    for i, ln in enumerate(lines):
        if ln.ip_key and (ips is None or ln.ip_key in ips) and ln.has(host):
            lines[i] = ln.with_names([n for n in ln.names if n.lower() != host.lower()]) or ""
    out.update(update_file(ctx, path, old, _join(lines)), f"remove {host} from {path}", f"removed {host} from {path}")
    return out.result(f"{host} is not in {path}")


def _static_hostname() -> str | None:
    text = read_text(HOSTNAME_FILE)
    return text.strip().splitlines()[0].strip() if text and text.strip() else None


def hostname(ctx: StateContext, name: str, hosts_file: str = HOSTS_FILE) -> dict:
    """The node's hostname: now, after reboots, and on the 127.0.1.1 line of /etc/hosts.

    Uses ``hostnamectl`` when systemd runs, else writes /etc/hostname and calls ``hostname``. As
    raspi-config does, the old name on the ``127.0.1.1`` line of /etc/hosts becomes the new one (the
    line is added if missing), so that the node keeps resolving its own name.

    Arguments:
      name: the hostname: lowercase letters, digits and '-', dots between labels.
      hosts_file: the hosts file to fix, default /etc/hosts.

    Example::

        set-hostname:
          host.hostname:
            - name: {{ node.id }}
    """
    new = _check_hostname(name)
    path = absolute_path(hosts_file, "hosts_file")
    kernel, static = socket.gethostname(), _static_hostname()
    old_names = {n for n in (kernel, static) if n and n != new}

    # The 127.0.1.1 line: old names (and old.domain) become the new one.
    hosts_old = read_text(path)
    lines: list = _hosts_lines(path, hosts_old) if hosts_old is not None else []
    own = [i for i, ln in enumerate(lines) if ln.ip_key == LOOPBACK_HOST_IP]
    if own:
        ln = lines[own[0]]
        names = []
        for n in ln.names:
            base, dot, domain = n.partition(".")
            renamed = new + dot + domain if base in old_names and (not dot or "." not in new) else n
            if renamed not in names:
                names.append(renamed)
        if new not in names:
            names.insert(0, new)
        if names != ln.names:
            lines[own[0]] = _HostsLine(ln.with_names(names))
    else:
        _append(lines, f"{LOOPBACK_HOST_IP}\t{new}\n")

    out = Outcome(ctx, name)
    if kernel != new or static != new:
        if not ctx.test:
            _set_hostname(ctx, new, out)
            if socket.gethostname() != new or _static_hostname() != new:
                return out.fail(f"the hostname is still {socket.gethostname()!r} "
                                f"(/etc/hostname: {_static_hostname()!r}) after setting it; {'; '.join(out.notes)}")
        out.change("hostname", {"old": kernel if kernel != new else static, "new": new},
                   f"set the hostname to {new}", f"set the hostname to {new}")
    hosts_changes = update_file(ctx, path, hosts_old, _join(lines))
    if "hostname" in out.changes:
        out.update(hosts_changes)  # said with the hostname
    else:
        out.update(hosts_changes, f"fix the {LOOPBACK_HOST_IP} line of {path}",
                   f"fixed the {LOOPBACK_HOST_IP} line of {path}")
    return out.result(f"the hostname is {new}")


def _set_hostname(ctx: StateContext, new: str, out: Outcome) -> None:
    if systemd_running() and ctx.which("hostnamectl"):
        res = ctx.run(["hostnamectl", "set-hostname", new])
        if res.ok:
            return
        out.note(f"hostnamectl failed ({res.stderr.strip() or res.returncode}), set directly instead")
    try:
        write_atomic(HOSTNAME_FILE, new + "\n", mode=0o644)
    except OSError as exc:
        raise StateError(f"cannot write {HOSTNAME_FILE}: {exc.strerror}") from None
    res = ctx.run(["hostname", new])
    if not res.ok:
        try:
            socket.sethostname(new)
        except OSError as exc:
            raise StateError(f"cannot set the hostname: {exc.strerror}") from None
