"""user: local user accounts (Salt's user.present and user.absent).

Changes go through the system's own tools -- useradd, usermod, userdel, and chpasswd for password
hashes -- so that /etc/passwd, /etc/shadow, /etc/group, /etc/gshadow and /etc/subuid stay
consistent and locked as those tools lock them. The current state is read from /etc/passwd and
/etc/group (the pwd and grp modules) and /etc/shadow.
"""

from __future__ import annotations

import grp
import os
import pwd
import re

from .base import Outcome, StateContext, StateError, Text, join_words, output_tail, read_text, string_list

__states__ = ("present", "absent")

SHADOW = "/etc/shadow"
LOGIN_DEFS = "/etc/login.defs"
# Looser than useradd's default rule and stricter than Debian's --badname: nothing that a command
# could read as an option, and nothing that breaks /etc/passwd's colon-separated lines.
NAME_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}\$?\Z")


def check_name(name: str, what: str = "user") -> None:
    if not NAME_RE.match(name) or name.isdigit():
        raise StateError(f"{name!r} is not a valid {what} name (letters, digits, '_', '.', '-'; at most 32)")


def _field(value, what: str, allow_comma: bool = True) -> str:
    """A value that goes into a colon-separated line of /etc/passwd or /etc/shadow."""
    text = str(value)
    if ":" in text or "\n" in text or "\0" in text:
        raise StateError(f"{what} must not contain ':' or a line break")
    if not allow_comma and "," in text:
        raise StateError(f"{what} must not contain ',' (it separates the GECOS fields)")
    return text


def _path(value, what: str) -> str:
    text = _field(value, what)
    if not text.startswith("/"):
        raise StateError(f"{what} must be an absolute path, not {text!r}")
    return os.path.normpath(text)


def get_user(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def get_group(spec: str | int) -> grp.struct_group | None:
    """A group by name, or by number (an int or a string of digits, as Salt's gid takes)."""
    try:
        if isinstance(spec, int) or str(spec).isdigit():
            return grp.getgrgid(int(spec))
        return grp.getgrnam(str(spec))
    except (KeyError, OverflowError):
        return None


def memberships(name: str) -> set[str]:
    """The supplementary groups that list the user (the primary group is in /etc/passwd)."""
    return {g.gr_name for g in grp.getgrall() if name in g.gr_mem}


def shadow_hash(name: str) -> str | None:
    """The user's password field in /etc/shadow; None when the user has no line there."""
    text = read_text(SHADOW) or ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > 1 and fields[0] == name:
            return fields[1]
    return None


def _password_set(current: str | None) -> bool:
    # "", "*", "!" and "!..." (locked, as useradd leaves a new account) are no usable password.
    return bool(current) and not current.startswith(("!", "*"))


def _home_mode() -> int:
    """The mode useradd gives a home directory: HOME_MODE, else 0777 minus UMASK (login.defs)."""
    settings = {}
    for line in (read_text(LOGIN_DEFS) or "").splitlines():
        parts = line.split()
        if len(parts) >= 2 and not parts[0].startswith("#"):
            settings[parts[0]] = parts[1]
    for key, default in (("HOME_MODE", None), ("UMASK", "022")):
        value = settings.get(key, default)
        if value is not None:
            try:
                mode = int(value, 8)
            except ValueError:
                continue
            return mode & 0o7777 if key == "HOME_MODE" else 0o777 & ~mode
    return 0o755


def _run(ctx: StateContext, argv: list[str], input: str | None = None) -> None:
    res = ctx.run(argv, timeout=120, input=input)
    if res.returncode == 127:
        raise _Failed(f"{argv[0]} is not installed (package passwd)")
    if not res.ok:
        raise _Failed(f"{argv[0]} failed (exit status {res.returncode}): {output_tail(res, 4)}")


class _Failed(Exception):
    """A command failed after other changes were made: report them with the failure."""


def _set_password(ctx: StateContext, name: str, password: str, out: Outcome) -> None:
    if not ctx.test:
        # chpasswd reads the hash on stdin: on a command line every local user could read it in ps.
        _run(ctx, ["chpasswd", "-e"], input=f"{name}:{password}\n")
    out.change("password", "changed", f"set the password of {name}", f"set the password of {name}")


def present(ctx: StateContext, name: str, uid: int | None = None, gid: int | str | None = None,
            groups: list[str] | str | None = None, optional_groups: list[str] | str | None = None,
            remove_groups: bool = True, home: str | None = None, createhome: bool = True,
            password: str | None = None, enforce_password: bool = True, shell: str | None = None,
            fullname: Text | None = None, system: bool = False, usergroup: bool | None = None,
            allow_uid_change: bool = False, allow_gid_change: bool = False) -> dict:
    """A local user account with the given properties (Salt's user.present).

    A missing user is created with useradd; an existing one has what differs changed with usermod.
    Arguments not given are left as they are. As in Salt, the uid or primary group of an existing
    user is not changed unless ``allow_uid_change`` / ``allow_gid_change`` says so (files keep
    their old owner), and a changed ``home`` is set without moving the old one's files.

    Arguments:
      name: the user name (default: the state's id).
      uid: the user id; default: the next free one when created.
      gid: the primary group, by name or number; it must exist (a group.present state before this
        one creates it). Default when created: a new group named as the user (Debian's useradd).
      groups: supplementary groups (a list); each must exist. With ``remove_groups`` (the default)
        the user is taken out of every other supplementary group, so ``groups: []`` removes them
        all; not given: the memberships are left as they are.
      optional_groups: like groups, but those that do not exist are skipped.
      remove_groups: true (default, as in Salt) to remove the user from supplementary groups not
        listed in groups/optional_groups; false to only add.
      home: the home directory; default when created: /home/NAME.
      createhome: create the home directory (from /etc/skel) when the user is created, and create
        a missing ``home`` of an existing user (empty), default true.
      password: the password *hash* (as in /etc/shadow, e.g. from ``mkpasswd -m sha-512``), never a
        plain password; set through chpasswd, never shown in results.
      enforce_password: false to leave a password that is already set alone, default true.
      shell: the login shell, e.g. /bin/bash; default when created: useradd's (SHELL in
        /etc/default/useradd).
      fullname: the full name (the first GECOS field); the other GECOS fields are kept.
      system: create a system account (uid below 1000, no aging), default false; only at creation.
      usergroup: true/false to create a group of the user's name or not, at creation; default:
        as login.defs says (USERGROUPS_ENAB, yes on Debian).
      allow_uid_change, allow_gid_change: allow changing the uid / primary group of an existing
        user, default false (then a different value fails the state).

    Example::

        pi-admin:
          user.present:
            - fullname: Cluster Admin
            - shell: /bin/bash
            - uid: 1010
            - groups:
              - sudo
              - video
            - password: "$6$rounds=656000$Ph7...$Qy0..."
        slurm:
          user.present:
            - system: true
            - home: /var/lib/slurm
            - shell: /usr/sbin/nologin
    """
    check_name(name)
    if uid is not None and uid < 0:
        raise StateError(f"uid must not be negative, not {uid}")
    if isinstance(gid, int) and gid < 0:
        raise StateError(f"gid must not be negative, not {gid}")
    if isinstance(gid, str):
        gid = gid.strip()
        if not gid.isdigit():
            check_name(gid, "group")
    home = None if home is None else _path(home, "home")
    shell = None if shell is None else _path(shell, "shell")
    fullname = None if fullname is None else _field(fullname, "fullname", allow_comma=False)
    password = None if password is None else _field(password, "password")
    required = string_list(groups, "groups", allow_empty=False)
    optional = string_list(optional_groups, "optional_groups", allow_empty=False)
    for group_name in required + optional:
        if not group_name.isdigit():
            check_name(group_name, "group")
    manage_groups = groups is not None or optional_groups is not None

    out = Outcome(ctx, name)
    # The groups as names; required ones that do not exist fail a real run (in test mode an
    # earlier group.present state of the same run may create them).
    account = get_user(name)
    # A new user's own group, which useradd creates as its primary group (Debian's default), may be
    # listed in groups: it is not there yet, and it is not a supplementary group.
    own_group = account is None and gid is None and usergroup is not False
    wanted: list[str] = []
    absent_groups: list[str] = []
    for group_name in required:
        if own_group and group_name == name and get_group(name) is None:
            continue
        found = get_group(group_name)
        if found is None:
            absent_groups.append(group_name)
        if (found.gr_name if found else group_name) not in wanted:
            wanted.append(found.gr_name if found else group_name)
    for group_name in optional:
        found = get_group(group_name)
        if found is not None and found.gr_name not in wanted:
            wanted.append(found.gr_name)
    primary = None if gid is None else get_group(gid)
    if gid is not None and primary is None:
        absent_groups.insert(0, str(gid))
    if absent_groups:
        listed = join_words(absent_groups)
        if not ctx.test:
            raise StateError(f"no group {listed} on this node (a group.present state before this one creates it)")
        out.note(f"group {listed} does not exist yet")

    try:
        if account is None:
            return _create(ctx, out, name, uid, gid, wanted, home, createhome, password, shell, fullname, system,
                           usergroup)
        return _modify(ctx, out, account, uid, primary, gid, wanted if manage_groups else None, remove_groups,
                       home, createhome, password, enforce_password, shell, fullname, allow_uid_change,
                       allow_gid_change)
    except _Failed as exc:
        return out.fail(str(exc))


def _create(ctx, out, name, uid, gid, wanted, home, createhome, password, shell, fullname, system, usergroup):
    argv = ["useradd"]
    for flag, value in (("-u", uid), ("-g", gid), ("-d", home), ("-s", shell), ("-c", fullname)):
        if value is not None:
            argv += [flag, str(value)]
    if wanted:
        argv += ["-G", ",".join(wanted)]
    argv.append("-m" if createhome else "-M")
    if system:
        argv.append("-r")
    if usergroup is not None:
        argv.append("-U" if usergroup else "-N")
    if ctx.test:
        out.change("created", name, f"create user {name}", f"created user {name}")
        if password is not None:
            _set_password(ctx, name, password, out)
        return out.result()
    _run(ctx, argv + ["--", name])
    account = get_user(name)
    if account is None:
        raise _Failed(f"useradd succeeded but there is no user {name}")
    out.change("created", name, f"create user {name}", f"created user {name}")
    out.update({"uid": account.pw_uid, "gid": account.pw_gid, "home": account.pw_dir, "shell": account.pw_shell,
                "groups": sorted(memberships(name))})
    if password is not None and shadow_hash(name) != password:
        _set_password(ctx, name, password, out)
    return out.result()


def _modify(ctx, out, account, uid, primary, gid, wanted, remove_groups, home, createhome, password,
            enforce_password, shell, fullname, allow_uid_change, allow_gid_change):
    name = account.pw_name
    refused = []
    if uid is not None and account.pw_uid != uid and not allow_uid_change:
        refused.append(f"user {name} has uid {account.pw_uid}, not {uid}: changing it needs allow_uid_change: true "
                       f"(files keep the old uid)")
    if primary is not None and account.pw_gid != primary.gr_gid and not allow_gid_change:
        refused.append(f"user {name} has primary group {account.pw_gid}, not {primary.gr_gid} ({primary.gr_name}): "
                       f"changing it needs allow_gid_change: true")
    if refused:  # nothing changed: the state fails as a whole, as in Salt
        raise StateError("; ".join(refused))

    args: list[str] = []
    changes: dict = {}  # recorded once usermod made them
    what: list[str] = []
    if uid is not None and account.pw_uid != uid:
        args += ["-u", str(uid)]
        changes["uid"] = uid
        what.append("uid")
    if primary is not None and account.pw_gid != primary.gr_gid:
        args += ["-g", str(primary.gr_gid)]
        changes["gid"] = primary.gr_gid
        what.append("primary group")
    elif gid is not None and primary is None:  # test mode: the group comes with an earlier state
        changes["gid"] = str(gid)
        what.append("primary group")
    if home is not None and os.path.normpath(account.pw_dir) != home:
        args += ["-d", home]
        changes["home"] = home
        what.append("home")
    if shell is not None and account.pw_shell != shell:
        args += ["-s", shell]
        changes["shell"] = shell
        what.append("shell")
    gecos = account.pw_gecos.split(",")
    if fullname is not None and gecos[0] != fullname:
        args += ["-c", ",".join([fullname] + gecos[1:])]
        changes["fullname"] = fullname
        what.append("full name")
    if wanted is not None:
        current = memberships(name)
        primary_name = primary.gr_name if primary is not None else _group_name(account.pw_gid)
        add = set(wanted) - current - {primary_name}
        drop = current - set(wanted) if remove_groups else set()
        if add or drop:
            final = sorted((current - drop) | add)
            args += ["-G", ",".join(final)] if remove_groups else ["-a", "-G", ",".join(sorted(add))]
            changes["groups"] = final
            words = [f"add {', '.join(sorted(add))}"] if add else []
            words += [f"remove {', '.join(sorted(drop))}"] if drop else []
            what.append(f"groups ({'; '.join(words)})")
    if args:
        if not ctx.test:
            _run(ctx, ["usermod", *args, "--", name])
        out.update(changes, f"change {join_words(what)} of user {name}", f"changed {join_words(what)} of user {name}")
    # As Salt: only a home given in the state is created for an existing user (a system user's
    # /nonexistent stays so).
    if createhome and home is not None and not os.path.isdir(home):
        if not ctx.test:
            _make_home(home, uid if uid is not None else account.pw_uid,
                       primary.gr_gid if primary is not None else account.pw_gid)
        out.change("home_created", home, f"create the home directory {home}", f"created the home directory {home}")
    if password is not None:
        current_hash = shadow_hash(name)
        if current_hash != password:
            if enforce_password or not _password_set(current_hash):
                _set_password(ctx, name, password, out)
            else:
                out.note("the password is set already and enforce_password is false: left as it is")
    return out.result(f"user {name} is as wanted")


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def _make_home(path: str, uid: int, gid: int) -> None:
    # As Salt does for an existing user: the directory itself (its parent must exist), not /etc/skel.
    try:
        os.mkdir(path, 0o700)
        os.chown(path, uid, gid)
        os.chmod(path, _home_mode())
    except OSError as exc:
        raise _Failed(f"cannot create the home directory {path}: {exc.strerror}") from None


def absent(ctx: StateContext, name: str, purge: bool = False, force: bool = False) -> dict:
    """No local user account of that name (Salt's user.absent), removed with userdel.

    userdel also removes the user's own group when no other user has it as primary group (Debian's
    USERGROUPS_ENAB). A user with running processes is refused by userdel unless ``force``.

    Arguments:
      name: the user name (default: the state's id).
      purge: also remove the home directory and mail spool (``userdel -r``), default false.
      force: remove the user even while logged in or running processes (``userdel -f``), default
        false.

    Example::

        pi:
          user.absent:
            - purge: true
    """
    check_name(name)
    out = Outcome(ctx, name)
    if get_user(name) is None:
        return out.result(f"user {name} is absent")
    extra = " and its home directory" if purge else ""
    if not ctx.test:
        res = ctx.run(["userdel", *(["-r"] if purge else []), *(["-f"] if force else []), "--", name], timeout=120)
        if get_user(name) is not None:
            if res.returncode == 127:
                return out.fail("userdel is not installed (package passwd)")
            return out.fail(f"userdel failed (exit status {res.returncode}): {output_tail(res, 4)}")
        if not res.ok:  # e.g. exit 12: the user is gone, but its home directory was missing already
            out.note(f"userdel said: {output_tail(res, 2)}")
    out.change("removed", name, f"remove user {name}{extra}", f"removed user {name}{extra}")
    return out.result()
