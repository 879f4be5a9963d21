"""cmd: run a shell command, guarded by `creates` (and the engine's `unless`/`onlyif`); or, with
Salt's cmd.wait, only when a state it watches changed."""

from __future__ import annotations

import os
import pwd

from .base import Outcome, StateContext, StateError, string_list

__states__ = ("run", "wait")


def _environment(env: dict | list | None) -> dict[str, str]:
    """Salt accepts a mapping or a list of one-entry mappings."""
    if env is None:
        return {}
    items = env if isinstance(env, list) else [env]
    merged: dict[str, str] = {}
    for item in items:
        if not isinstance(item, dict):
            raise StateError(f"env must be a mapping of NAME: value, not {env!r}")
        for key, value in item.items():
            if not isinstance(key, str) or not key or "=" in key:
                raise StateError(f"env name {key!r} is not a variable name")
            merged[key] = "" if value is None else str(value)
    return merged


def run(ctx: StateContext, name: str, creates: str | list[str] | None = None, cwd: str | None = None,
        env: dict | list[dict] | None = None, runas: str | None = None, shell: str = "/bin/sh",
        timeout: float | None = None, success_retcodes: list[int] | None = None) -> dict:
    """Run a shell command; its exit status, stdout and stderr go into the result.

    A command always counts as a change when it runs: guard it with ``creates`` (skip when the
    files exist) or the ``unless``/``onlyif`` every state takes, so that a second run does nothing.

    Arguments:
      name: the command line, run by ``shell -c`` (default: the state's id).
      creates: a path, or a list of paths: when all exist the command is not run.
      cwd: the working directory (default: the home of ``runas``, root's home for root).
      env: extra environment variables, a mapping (``{PATH: ..., LANG: C}``).
      runas: a user to run the command as (``runuser``).
      shell: the shell that runs it, default /bin/sh.
      timeout: seconds before the command is killed (default: an hour).
      success_retcodes: exit statuses besides 0 that count as success.

    Example::

        build-tools:
          cmd.run:
            - name: make install
            - cwd: /opt/tool
            - creates: /usr/local/bin/tool
            - env:
                LANG: C
    """
    if not name.strip():
        raise StateError("name must be the command to run")
    created = string_list(creates, "creates", allow_empty=False)
    for path in created:
        if not path.startswith("/"):
            raise StateError(f"creates must be absolute paths, not {path!r}")
    out = Outcome(ctx, name)
    if created and all(os.path.exists(p) for p in created):
        return out.result(f"skipped: {', '.join(created)} exist{'s' * (len(created) == 1)}")
    variables = _environment(env)
    if runas is not None:
        try:
            home = pwd.getpwnam(runas).pw_dir
        except KeyError:
            if ctx.test:  # a package an earlier state installs may create the user
                out.change("command", name, f"run (user {runas!r} does not exist yet)")
                return out.result()
            raise StateError(f"no user {runas!r} on this node") from None
    else:
        home = os.path.expanduser("~root")
    if cwd is not None:
        if not cwd.startswith("/"):
            raise StateError(f"cwd must be an absolute path, not {cwd!r}")
        if not os.path.isdir(cwd):
            if ctx.test:
                out.change("command", name, f"run in {cwd} (which does not exist yet)")
                return out.result()
            raise StateError(f"cwd {cwd} is not a directory")
    else:
        cwd = home if os.path.isdir(home) else "/"
    if not shell.startswith("/"):
        raise StateError(f"shell must be an absolute path, not {shell!r}")
    if not os.access(shell, os.X_OK):
        raise StateError(f"shell {shell} is not an executable")
    if timeout is not None and timeout <= 0:
        raise StateError(f"timeout must be a positive number of seconds, not {timeout!r}")
    ok_codes = {0}
    for code in success_retcodes or []:
        if isinstance(code, bool) or not isinstance(code, int):
            raise StateError(f"success_retcodes must be a list of numbers, not {success_retcodes!r}")
        ok_codes.add(code)
    if ctx.test:
        out.change("command", name, f"run: {name}")
        return out.result()
    res = ctx.run([shell, "-c", name], env=variables, cwd=cwd, timeout=timeout or 3600, runas=runas)
    out.update({"retcode": res.returncode, "stdout": res.stdout, "stderr": res.stderr}, "", f"ran: {name}")
    if res.returncode == 124 and res.stderr.startswith("timed out"):
        return out.fail(f"command {res.stderr}")
    if res.returncode not in ok_codes:
        return out.fail(f"command failed with exit status {res.returncode}")
    return out.result()


def wait(ctx: StateContext, name: str, creates: str | list[str] | None = None, cwd: str | None = None,
         env: dict | list[dict] | None = None, runas: str | None = None, shell: str = "/bin/sh",
         timeout: float | None = None, success_retcodes: list[int] | None = None) -> dict:
    """Run a shell command only when a state it watches changed (Salt's cmd.wait).

    On its own the state does nothing. With a ``watch`` requisite (or another state's
    ``watch_in``) the command runs, exactly as cmd.run would, when one of the watched states
    changed in this run -- the same trigger that makes service.running restart. ``onchanges``
    alone does not trigger it, as in Salt: write cmd.run with ``onchanges`` for that, which Salt
    itself recommends over cmd.wait. In test mode a watched state that would change makes it
    report that it would run.

    Arguments:
      name: the command line, run by ``shell -c`` (default: the state's id).
      creates: a path, or a list of paths: when all exist the command is not run.
      cwd: the working directory (default: the home of ``runas``, root's home for root).
      env: extra environment variables, a mapping (``{PATH: ..., LANG: C}``).
      runas: a user to run the command as (``runuser``).
      shell: the shell that runs it, default /bin/sh.
      timeout: seconds before the command is killed (default: an hour).
      success_retcodes: exit statuses besides 0 that count as success.

    Example::

        /etc/exports:
          file.managed:
            - contents: |
                /srv/nfs 10.77.0.0/24(rw,no_subtree_check)
        exportfs -ra:
          cmd.wait:
            - watch:
              - file: /etc/exports
    """
    if not name.strip():
        raise StateError("name must be the command to run")
    if not ctx.watch_changed:
        # Salt's cmd.wait: the state itself is a no-op; only its watch (mod_watch) runs the command.
        return Outcome(ctx, name).result("nothing to run: no state it watches changed")
    return run(ctx, name, creates=creates, cwd=cwd, env=env, runas=runas, shell=shell, timeout=timeout,
               success_retcodes=success_retcodes)
