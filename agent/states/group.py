"""group: local groups and their members (Salt's group.present and group.absent).

Changes go through the system's own tools -- groupadd, groupmod, gpasswd and groupdel -- which keep
/etc/group and /etc/gshadow consistent and locked. The current state is read from /etc/group (grp).
Members here are the supplementary members /etc/group lists; users whose primary group this is are
not listed there, and are left alone.
"""

from __future__ import annotations

from .base import Outcome, StateContext, StateError, join_words, output_tail, string_list
from .user import check_name, get_group, get_user

__states__ = ("present", "absent")


def _users(value, what: str) -> list[str] | None:
    if value is None:
        return None
    names: list[str] = []
    for user_name in string_list(value, what, allow_empty=False):
        check_name(user_name)
        if user_name not in names:
            names.append(user_name)
    return names


def _run(ctx: StateContext, argv: list[str]) -> str | None:
    """Run a command; why it failed, or None."""
    res = ctx.run(argv, timeout=120)
    if res.returncode == 127:
        return f"{argv[0]} is not installed (package passwd)"
    if not res.ok:
        return f"{argv[0]} failed (exit status {res.returncode}): {output_tail(res, 4)}"
    return None


def present(ctx: StateContext, name: str, gid: int | None = None, system: bool = False,
            addusers: list[str] | str | None = None, delusers: list[str] | str | None = None,
            members: list[str] | str | None = None) -> dict:
    """A local group, with the given gid and members (Salt's group.present).

    A missing group is created with groupadd; an existing one with another gid gets it with
    groupmod (as in Salt; files keep the old gid). Members are set with gpasswd: ``members`` is
    the whole list (anyone else is removed), ``addusers``/``delusers`` only add or remove those
    named. Not given: the members are left as they are.

    Arguments:
      name: the group name (default: the state's id).
      gid: the group id; default: the next free one when created.
      system: create a system group (gid below 1000), default false; only at creation.
      addusers: users to add as members (a list); each must exist.
      delusers: users to take out of the group (a list).
      members: the complete list of members, replacing the current one; not together with
        addusers/delusers.

    Example::

        gpio:
          group.present:
            - addusers:
              - pi-admin
        cluster:
          group.present:
            - gid: 3000
            - members:
              - alice
              - bob
    """
    check_name(name, "group")
    if gid is not None and gid < 0:
        raise StateError(f"gid must not be negative, not {gid}")
    members = _users(members, "members")
    add = _users(addusers, "addusers") or []
    drop = _users(delusers, "delusers") or []
    if members is not None and (addusers is not None or delusers is not None):
        raise StateError("give members, or addusers/delusers, not both")
    if set(add) & set(drop):
        raise StateError(f"{join_words(sorted(set(add) & set(drop)))} both in addusers and delusers")

    out = Outcome(ctx, name)
    unknown = [u for u in (members if members is not None else add) if get_user(u) is None]
    if unknown:
        if not ctx.test:
            raise StateError(f"no user {join_words(unknown)} on this node (a user.present state before this one "
                             f"creates it)")
        out.note(f"user {join_words(unknown)} does not exist yet")  # an earlier state of the run may create it

    # Each change is recorded once its command succeeded: a failure reports only what was done.
    group = get_group(name)
    if group is None:
        if not ctx.test:
            failed = _run(ctx, ["groupadd", *(["-g", str(gid)] if gid is not None else []),
                                *(["-r"] if system else []), "--", name])
            if failed:
                return out.fail(failed)
            group = get_group(name)
            if group is None:
                return out.fail(f"groupadd succeeded but there is no group {name}")
            out.change("gid", group.gr_gid)
        out.change("created", name, f"create group {name}", f"created group {name}")
        current: list[str] = []
    else:
        if gid is not None and group.gr_gid != gid:
            if not ctx.test:
                failed = _run(ctx, ["groupmod", "-g", str(gid), "--", name])
                if failed:
                    return out.fail(failed)
            out.change("gid", gid, f"change the gid of group {name} from {group.gr_gid} to {gid}",
                       f"changed the gid of group {name} from {group.gr_gid} to {gid}")
        current = list(group.gr_mem)

    if members is not None:
        wanted = members
    else:
        wanted = [u for u in current if u not in drop] + [u for u in add if u not in current]
    joining = [u for u in wanted if u not in current]
    leaving = [u for u in current if u not in wanted]
    if joining or leaving:
        words = "; ".join(filter(None, [f"add {', '.join(joining)}" if joining else "",
                                        f"remove {', '.join(leaving)}" if leaving else ""]))
        if not ctx.test:
            # One command for the whole list: gpasswd -M replaces the members in /etc/group and gshadow.
            failed = _run(ctx, ["gpasswd", "-M", ",".join(wanted), "--", name])
            if failed:
                return out.fail(failed)
        out.change("members", sorted(wanted), f"change the members of group {name} ({words})",
                   f"changed the members of group {name} ({words})")
    return out.result(f"group {name} is as wanted")


def absent(ctx: StateContext, name: str) -> dict:
    """No local group of that name (Salt's group.absent), removed with groupdel.

    groupdel refuses to remove the primary group of an existing user: the state then fails,
    saying so (remove or change that user first).

    Arguments:
      name: the group name (default: the state's id).

    Example::

        old-project:
          group.absent
    """
    check_name(name, "group")
    out = Outcome(ctx, name)
    if get_group(name) is None:
        return out.result(f"group {name} is absent")
    if not ctx.test:
        failed = _run(ctx, ["groupdel", "--", name])
        if failed:
            return out.fail(failed)
    out.change("removed", name, f"remove group {name}", f"removed group {name}")
    return out.result()
