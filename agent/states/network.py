"""network: a fixed IPv4 address, set through whatever manages the node's network.

Raspberry Pi OS bookworm uses NetworkManager, bullseye dhcpcd, and many minimal images (and the
`pimaster lab` nodes) systemd-networkd; the state finds which one runs and speaks its language.

An address change is never put in effect in the middle of a job: it could cut the agent off before
it reports. The new setting is written (staged), the job's result goes to the master from the old
address, and only then does the agent put the change in effect and reconnect. If the master does
not accept the agent from the new setting within ``confirm_timeout``, the agent restores the old
one by itself (see piagent.netchange).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from .. import netchange
from .base import Outcome, StateContext, StateError, read_text, string_list, systemd_running, update_file

__states__ = ("static",)

BACKENDS = ("networkmanager", "dhcpcd", "networkd")
# The unit that tells which backend runs (`systemctl is-active`), in order of preference: a
# bookworm image may still have dhcpcd installed but inactive.
BACKEND_UNITS = {"networkmanager": "NetworkManager", "dhcpcd": "dhcpcd", "networkd": "systemd-networkd"}
NETWORKD_DIR = "/etc/systemd/network"
DHCPCD_CONF = "/etc/dhcpcd.conf"
IFACE_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}\Z")
MANAGED = "managed by pimaster (network.static)"


def _desired(name: str, address: str, gateway: str | None,
             dns: list | str | None) -> tuple[str, ipaddress.IPv4Interface, str | None, list[str]]:
    if not IFACE_RE.match(name):
        raise StateError(f"name must be a network interface, like eth0 (got {name!r})")
    if "/" not in address:
        raise StateError(f"address must be an IPv4 address with its prefix length, like 10.0.0.12/24 (got {address!r})")
    try:
        iface = ipaddress.IPv4Interface(address)
    except ValueError as exc:
        raise StateError(f"address: {exc}") from None
    if iface.network.prefixlen < 32 and iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise StateError(f"address: {iface.ip} is the network's own or broadcast address")
    gw = None
    if gateway not in (None, ""):
        try:
            gw = str(ipaddress.IPv4Address(str(gateway)))
        except ValueError:
            raise StateError(f"gateway: {gateway!r} is not an IPv4 address") from None
        if ipaddress.IPv4Address(gw) not in iface.network:
            raise StateError(f"gateway {gw} is outside {iface.network}: the node could not reach it")
    servers = []
    for server in string_list(dns, "dns"):
        try:
            servers.append(str(ipaddress.ip_address(server)))
        except ValueError:
            raise StateError(f"dns: {server!r} is not an IP address") from None
    return name, iface, gw, servers


def _active(ctx: StateContext, unit: str) -> bool:
    return ctx.run(["systemctl", "is-active", "--quiet", unit]).ok


NO_BACKEND = ("none of NetworkManager, dhcpcd or systemd-networkd is running on this node: "
              "pimaster cannot set a fixed address here")


def _backend(ctx: StateContext, backend: str) -> str | None:
    """The backend to write to; None (with backend auto) when none of them runs."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise StateError(f"backend must be auto or one of {', '.join(BACKENDS)} (got {backend!r})")
        return backend
    if not systemd_running():
        raise StateError("cannot tell what manages the network without systemd; give backend:")
    for name, unit in BACKEND_UNITS.items():
        if _active(ctx, unit):
            return name
    return None


def _set_from_outside(ctx: StateContext, name: str, iface: str, want: ipaddress.IPv4Interface, live: list[str],
                      gateway: str | None, servers: list[str]) -> dict:
    """No backend runs: right only if the address was set from outside (an ARM lab node under
    qemu-user, where no network manager can run) and nothing here could ever manage it: none of
    the managers is enabled, starting, or failed (then it is a broken manager, not none), and the
    interface has exactly that address. A gateway or DNS servers could be kept by nothing: refused."""
    units = [unit + ".service" for unit in BACKEND_UNITS.values()]
    res = ctx.run(["systemctl", "show", "--property=Id,LoadState,ActiveState,UnitFileState", "--", *units])
    if not res.ok:
        raise StateError(f"cannot ask systemd about the network managers: {(res.stderr or res.stdout).strip()}")
    present = []
    for block in res.stdout.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if props.get("LoadState") == "not-found":
            continue
        if props.get("ActiveState") != "inactive" or props.get("UnitFileState", "").startswith("enabled"):
            present.append(f"{props.get('Id', '?')} is {props.get('ActiveState', '?')} "
                           f"({props.get('UnitFileState') or 'no unit file state'})")
    if present:
        raise StateError(f"{NO_BACKEND}: {'; '.join(present)}")
    if gateway or servers:
        raise StateError(f"{NO_BACKEND}: a gateway or DNS servers could not be kept here")
    if live != [want.with_prefixlen]:
        raise StateError(f"{NO_BACKEND} ({iface} has {', '.join(live) or 'no address'}, not just "
                         f"{want.with_prefixlen})")
    return Outcome(ctx, name).result(f"{iface} has {want.with_prefixlen}, set from outside: no network manager "
                                     f"runs or is enabled on this node, so nothing is written to keep it")


# -------------------------------------------------------------------------------- systemd-networkd
def _networkd_file(iface: str) -> str:
    # networkd uses the first file (in name order) whose [Match] fits, so 00- wins over the
    # image's own; the others stay as they are, inert for this interface.
    return f"{NETWORKD_DIR}/00-pimaster-{iface}.network"


def _networkd_text(iface: str, address: ipaddress.IPv4Interface, gateway: str | None, dns: list[str]) -> str:
    lines = [f"# {iface}'s fixed address, {MANAGED}: edits here are overwritten.",
             "[Match]", f"Name={iface}", "", "[Network]", f"Address={address.with_prefixlen}"]
    if gateway:
        lines.append(f"Gateway={gateway}")
    lines += [f"DNS={server}" for server in dns]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- dhcpcd
def _dhcpcd_block(iface: str, address: ipaddress.IPv4Interface, gateway: str | None, dns: list[str]) -> str:
    lines = [f"# {iface}: begin, {MANAGED}", f"interface {iface}", f"static ip_address={address.with_prefixlen}"]
    if gateway:
        lines.append(f"static routers={gateway}")
    if dns:
        lines.append(f"static domain_name_servers={' '.join(dns)}")
    lines.append(f"# {iface}: end")
    return "\n".join(lines) + "\n"


def _dhcpcd_text(old: str, iface: str, block: str) -> str:
    """dhcpcd.conf with this interface's settings replaced by the managed block.

    The block replaces an earlier managed one, else the file's own `interface IFACE` stanza (the
    seed guide appends one by hand: two stanzas would fight), else it is appended. A stanza runs
    until the next `interface` or `ssid` line.
    """
    lines = old.splitlines(keepends=True)

    def words(line: str) -> list[str]:
        return line.split("#", 1)[0].split()

    def stanza_end(start: int) -> int:
        end = next((i for i in range(start + 1, len(lines)) if words(lines[i])[:1] in (["interface"], ["ssid"])
                    or lines[i].startswith("# ") and f": begin, {MANAGED}" in lines[i]), len(lines))
        while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next stanza stay
            end -= 1
        return end

    begin = next((i for i, ln in enumerate(lines) if ln.startswith(f"# {iface}: begin, {MANAGED}")), None)
    if begin is not None:
        # Up to its end marker; without one (edited by hand), up to the next stanza.
        end = next((i + 1 for i in range(begin, len(lines)) if lines[i].startswith(f"# {iface}: end")), None)
        return "".join(lines[:begin]) + block + "".join(lines[end if end is not None else stanza_end(begin + 1):])
    start = next((i for i, ln in enumerate(lines) if words(ln) == ["interface", iface]), None)
    if start is not None:
        return "".join(lines[:start]) + block + "".join(lines[stanza_end(start):])
    text = "".join(lines)
    if text and not text.endswith("\n"):
        text += "\n"
    return text + ("\n" if text else "") + block


# -------------------------------------------------------------------------------- NetworkManager
def _nm_connection(ctx: StateContext, iface: str) -> tuple[str, str]:
    """The UUID and name of the connection active on ``iface`` (names need not be unique)."""
    res = ctx.run(["nmcli", "-t", "-f", "UUID,DEVICE,NAME", "connection", "show", "--active"])
    for line in res.stdout.splitlines() if res.ok else []:
        uuid, device, name = (line.split(":", 2) + ["", ""])[:3]
        if device == iface:
            return uuid, name.replace("\\:", ":")
    raise StateError(f"NetworkManager has no active connection on {iface}: "
                     f"{res.stderr.strip() or 'activate one first (nmcli device connect ' + iface + ')'}")


def _nm_settings(ctx: StateContext, connection: str) -> dict[str, str]:
    res = ctx.run(["nmcli", "-t", "-f", "ipv4.method,ipv4.addresses,ipv4.gateway,ipv4.dns",
                   "connection", "show", "uuid", connection])
    if not res.ok:
        raise StateError(f"cannot read NetworkManager connection {connection!r}: {res.stderr.strip()}")
    settings = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(":")
        settings[key.strip()] = value.replace("\\:", ":").strip()
    return {key: "" if settings.get(key, "") in ("--", "") else settings[key]
            for key in ("ipv4.method", "ipv4.addresses", "ipv4.gateway", "ipv4.dns")}


def _nm_args(settings: dict[str, str]) -> list[str]:
    return [arg for key, value in settings.items() for arg in (key, value)]


# -------------------------------------------------------------------------------- writing the setting
@dataclass
class _Staging:
    """A setting written for a backend: what changed, and what netchange needs to put it in effect
    after the job (``apply``) or to roll it back (``restore``: path -> old text; ``undo``)."""
    changes: dict = field(default_factory=dict)
    restore: dict[str, str | None] = field(default_factory=dict)
    apply: list[list[str]] = field(default_factory=list)
    undo: list[list[str]] = field(default_factory=list)


def _write_setting(ctx: StateContext, kind: str, iface: str, want: ipaddress.IPv4Interface, gateway: str | None,
                   servers: list[str]) -> _Staging:
    """Write the fixed address the way ``kind`` (the backend) keeps it, in test mode only say how."""
    staging = _Staging()
    if kind == "networkd":
        path = _networkd_file(iface)
        old = read_text(path)
        new = _networkd_text(iface, want, gateway, servers)
        staging.apply = [["networkctl", "reload"], ["networkctl", "reconfigure", iface]]
        if old != new:
            staging.restore[path] = old
            staging.changes.update(update_file(ctx, path, old, new, mode=0o644))
    elif kind == "dhcpcd":
        old = read_text(DHCPCD_CONF)
        new = _dhcpcd_text(old or "", iface, _dhcpcd_block(iface, want, gateway, servers))
        # dhcpcd leaves addresses it did not add (and, with Raspberry Pi OS's `persistent`, its
        # own) when it stops: flush them, or the node would answer on both addresses.
        staging.apply = [["systemctl", "stop", "dhcpcd"], ["ip", "-4", "addr", "flush", "dev", iface],
                         ["systemctl", "start", "dhcpcd"]]
        if old != new:
            staging.restore[DHCPCD_CONF] = old
            staging.changes.update(update_file(ctx, DHCPCD_CONF, old, new))
    else:
        connection, label = _nm_connection(ctx, iface)
        current = _nm_settings(ctx, connection)
        wanted = {"ipv4.method": "manual", "ipv4.addresses": want.with_prefixlen,
                  "ipv4.gateway": gateway or "", "ipv4.dns": ",".join(servers)}
        staging.apply = [["nmcli", "connection", "up", "uuid", connection]]
        differs = {k: {"old": current[k], "new": v} for k, v in wanted.items()
                   if [s.strip() for s in current[k].split(",") if s.strip()] != [s for s in v.split(",") if s]}
        if differs:
            staging.changes[f"NetworkManager connection {label}"] = differs
            staging.undo = [["nmcli", "connection", "modify", "uuid", connection, *_nm_args(current)]]
            if not ctx.test:
                res = ctx.run(["nmcli", "connection", "modify", "uuid", connection, *_nm_args(wanted)])
                if not res.ok:
                    raise StateError(f"nmcli could not change {label!r}: {res.stderr.strip()}")
    return staging


# -------------------------------------------------------------------------------- the state
def static(ctx: StateContext, name: str, address: str, gateway: str | None = None, dns: list[str] | str | None = None,
           backend: str = "auto", confirm_timeout: float | str = netchange.DEFAULT_CONFIRM_S) -> dict:
    """A fixed IPv4 address (with gateway and DNS servers) on one interface, kept after reboots.

    The change is written at once but put in effect only after this job's result has reached the
    master; the agent then reconnects from the new address. If the master does not accept it from
    there within ``confirm_timeout`` seconds, the agent restores the previous setting by itself
    (and `pimaster ping` shows a note). A second run with the same values changes nothing. On a
    node where none of the backends runs (its ``network_backend`` fact is ``none``: an address
    set from outside, as on an ARM lab node), the state succeeds when none of them is enabled
    either, the interface has exactly that address already, and no gateway or DNS is asked for;
    otherwise it fails.

    Arguments:
      name: the interface, e.g. eth0 (default: the state's id).
      address: the address with its prefix length, e.g. 10.0.0.12/24.
      gateway: the default gateway (optional; leave it out on an isolated cluster network).
      dns: DNS servers, a list of addresses (optional).
      backend: auto (default: whichever runs of NetworkManager, dhcpcd, systemd-networkd) or one
        of networkmanager (bookworm), dhcpcd (bullseye), networkd.
      confirm_timeout: seconds the new setting has to reach the master before it is rolled back,
        default 60 (at least 10).

    Example::

        eth0:
          network.static:
            - address: {{ node.ip }}/24
            - gateway: 10.0.0.1
            - dns: [10.0.0.1]
    """
    iface, want, gateway, servers = _desired(name, address, gateway, dns)
    try:
        confirm_s = float(confirm_timeout)  # "90" too
    except ValueError:
        raise StateError(f"confirm_timeout must be a number of seconds (got {confirm_timeout!r})") from None
    kind = _backend(ctx, backend)
    live = netchange.live_addresses(iface)
    if live is None:
        raise StateError(f"this node has no network interface {iface!r}")
    if kind is None:
        return _set_from_outside(ctx, name, iface, want, live, gateway, servers)
    staged = netchange.staged_change(ctx.state_dir, iface)
    pending_note = (f"; a change to {staged['address']} waits to take effect" if staged and
                    staged["address"] != want.with_prefixlen else "")

    staging = _write_setting(ctx, kind, iface, want, gateway, servers)
    changes = staging.changes
    out = Outcome(ctx, name)
    out.update(changes)
    in_effect = want.with_prefixlen in live
    if not changes and in_effect:
        return out.result(f"{iface} has {want.with_prefixlen} ({kind}){pending_note}")
    if not changes and staged and staged["address"] == want.with_prefixlen:
        return out.result(f"{iface} {want.with_prefixlen} is written and waits to take effect "
                          f"after a job result reaches the master")
    if not ctx.test:
        netchange.stage(ctx.state_dir, {"interface": iface, "address": want.with_prefixlen, "backend": kind,
                                        "restore": staging.restore, "apply": staging.apply, "undo": staging.undo},
                        confirm_s)
    no_route = "" if gateway else f"; no gateway given: the node will reach only {want.network}"
    out.change("address", {"old": ", ".join(live) or "none", "new": want.with_prefixlen},
               f"set {iface} to {want.with_prefixlen} ({kind})",
               f"set {iface} to {want.with_prefixlen} ({kind}); it takes effect once this result reaches the "
               f"master, and goes back to {', '.join(live) or 'the old setting'} unless the master is "
               f"reachable from the new address within {max(netchange.MIN_CONFIRM_S, confirm_s):.0f} s{no_route}")
    return out.result()
