"""test: Salt's test states, which change nothing: a no-op to hang requisites on, fixed
successes and failures (with or without a pretended change) to try requisites and outputs, and a
message in a run's report.

The results are Salt's, in a real run and in test mode alike, so that a Salt state file using them
behaves here as it does under Salt: the pretended change is Salt's ``{"testing": {"old":
"Unchanged", "new": "Something pretended to change"}}``, and the default comments are Salt's
("Success!", "Failure!"). Salt's ``"Random"`` for changes or result is refused: a state here
reports the same on every run.
"""

from __future__ import annotations

from .base import Outcome, StateContext, StateError, Text

__states__ = ("nop", "succeed_without_changes", "succeed_with_changes", "fail_without_changes",
              "fail_with_changes", "show_notification", "configurable_test_state")

# Salt's pretended change (salt/states/test.py), unchanged: Salt users' outputs and tests know it.
PRETENDED_CHANGE = {"testing": {"old": "Unchanged", "new": "Something pretended to change"}}


def _pretend(ctx: StateContext, name: str, *, changes: bool, succeed: bool, comment: str,
             fail_in_test: bool, notes: tuple[str, ...] | list[str] = ()) -> dict:
    """The result of a test state: ``succeed`` or fail, with the pretended change or none.

    A real run: Salt's result, the comment (or Salt's "Success!"/"Failure!"). Test mode says what
    would happen ("would fail with changes", then the comment); its result is Salt's: None when a
    change would be reported (whether the state would then succeed or fail), else True -- or False
    when the state would fail and ``fail_in_test`` says test mode fails too (Salt's
    fail_without_changes does).
    """
    out = Outcome(ctx, name)
    said = comment or ("Success!" if succeed else "Failure!")
    words = ("succeed" if succeed else "fail") + (" with changes" if changes else "")
    if changes:
        out.change("testing", dict(PRETENDED_CHANGE["testing"]), words, said)
    quiet_success = succeed and not changes  # nothing would happen: test mode says what a run says
    if ctx.test and comment and not quiet_success:
        out.note(comment)
    for note in notes:
        out.note(note)
    if not ctx.test:
        return out.result(said) if succeed else out.fail(out.comment(said))
    if not succeed and fail_in_test:
        return out.fail(out.comment(f"would {words}"))
    if not succeed and not changes:
        # Salt's configurable_test_state: a configured failure without changes is True in test mode.
        out.note("test mode does not fail: allow_test_mode_failure is false")
    return out.result(said if quiet_success else f"would {words}")


def nop(ctx: StateContext, name: str) -> dict:
    """Do nothing: always succeeds, changes nothing (Salt's test.nop).

    Something for requisites to point at, or a stand-in where a template would otherwise leave a
    state file empty. Salt's test.nop takes any argument and ignores it; here it takes
    only ``name`` (and the requisites every state takes): the master refuses others.

    Arguments:
      name: any text (default: the state's id).

    Example::

        everything-mounted:
          test.nop:
            - require:
              - mount: /clusterfs
              - mount: /boot/firmware
    """
    return _pretend(ctx, name, changes=False, succeed=True, comment="", fail_in_test=False)


def succeed_without_changes(ctx: StateContext, name: str, comment: Text | None = None) -> dict:
    """Succeed and change nothing, in test mode too (Salt's test.succeed_without_changes).

    Arguments:
      name: any text (default: the state's id).
      comment: the result's comment (default: "Success!").

    Example::

        reached-here:
          test.succeed_without_changes:
            - comment: all base states applied
    """
    return _pretend(ctx, name, changes=False, succeed=True, comment=_text(comment), fail_in_test=False)


def succeed_with_changes(ctx: StateContext, name: str, comment: Text | None = None) -> dict:
    """Succeed with a pretended change, so that watch and onchanges fire (Salt's succeed_with_changes).

    Nothing on the node changes; the result reports Salt's pretended change (``testing``: old
    "Unchanged", new "Something pretended to change"). In test mode the result is None ("would
    succeed with changes"), as for any state that would change something.

    Arguments:
      name: any text (default: the state's id).
      comment: the result's comment in a real run (default: "Success!"); test mode adds it after
        what would happen.

    Example::

        always-restart:
          test.succeed_with_changes: []
        chrony:
          service.running:
            - watch:
              - test: always-restart
    """
    return _pretend(ctx, name, changes=True, succeed=True, comment=_text(comment), fail_in_test=False)


def fail_without_changes(ctx: StateContext, name: str, comment: Text | None = None) -> dict:
    """Fail and change nothing, in test mode too (Salt's test.fail_without_changes).

    What Salt's own documentation suggests for a controlled failure: put it in a template branch
    that should never be taken (a node or an OS the states do not support), with the message as
    its name or comment; states that require it are then not run.

    Arguments:
      name: any text (default: the state's id), e.g. the reason.
      comment: the result's comment (default: "Failure!"); test mode adds it after "would fail".

    Example::

        {% if grains['oscodename'] != 'bookworm' %}
        unsupported:
          test.fail_without_changes:
            - name: "Only Debian bookworm is supported"
        {% endif %}
    """
    return _pretend(ctx, name, changes=False, succeed=False, comment=_text(comment), fail_in_test=True)


def fail_with_changes(ctx: StateContext, name: str, comment: Text | None = None) -> dict:
    """Fail with a pretended change, for onfail and onchanges both (Salt's test.fail_with_changes).

    Nothing on the node changes; the result reports Salt's pretended change (``testing``: old
    "Unchanged", new "Something pretended to change"). In test mode, as in Salt, the result is
    None ("would fail with changes"), not a failure.

    Arguments:
      name: any text (default: the state's id).
      comment: the result's comment in a real run (default: "Failure!"); test mode adds it after
        what would happen.

    Example::

        broken-on-purpose:
          test.fail_with_changes: []
        report-it:
          cmd.run:
            - name: logger "broken-on-purpose failed"
            - onfail:
              - test: broken-on-purpose
    """
    return _pretend(ctx, name, changes=True, succeed=False, comment=_text(comment), fail_in_test=False)


def show_notification(ctx: StateContext, name: str, text: Text) -> dict:
    """Show a message as the comment of a successful, unchanging state (Salt's test.show_notification).

    Arguments:
      name: any text (default: the state's id).
      text: the message, shown as the result's comment (in test mode too); required, not empty.

    Example::

        reboot-reminder:
          test.show_notification:
            - text: "Reboot {{ grains['id'] }} for the new kernel to take effect"
    """
    message = _text(text)
    if not message.strip():
        raise StateError("text must be the message to show, not empty")
    return Outcome(ctx, name).result(message)


def configurable_test_state(ctx: StateContext, name: str, changes: bool | str = True, result: bool | str = True,
                            comment: Text = "", warnings: str | list[str] | None = None,
                            allow_test_mode_failure: bool = False) -> dict:
    """A result as configured: changes or none, success or failure, a comment (Salt's test state).

    Salt's rules: ``changes: true`` reports Salt's pretended change (``testing``: old "Unchanged",
    new "Something pretended to change"); ``result`` is the result of a real run. In test mode the
    result is None when a change would be reported, else True -- a configured failure does not
    fail test mode unless ``allow_test_mode_failure`` is true. Salt's ``"Random"`` (for changes or
    result) is refused: a state here reports the same on every run; write true or false.

    Arguments:
      name: any text (default: the state's id).
      changes: true (default) to report the pretended change, false for none.
      result: true (default) to succeed, false to fail.
      comment: the result's comment (default: Salt's "Success!" or "Failure!"); test mode adds it
        after what would happen.
      warnings: a warning, or a list of them, added to the comment ("warning: ...").
      allow_test_mode_failure: fail in test mode too when ``result`` is false (default false).

    Example::

        my-custom-combo:
          test.configurable_test_state:
            - changes: true
            - result: false
            - comment: "bar.baz"
            - warnings: A warning
    """
    wants_changes = _switch(changes, "changes")
    succeed = _switch(result, "result")
    if isinstance(warnings, str):
        warnings = [warnings]
    notes = [f"warning: {w}" for w in warnings or []]
    return _pretend(ctx, name, changes=wants_changes, succeed=succeed, comment=_text(comment),
                    fail_in_test=allow_test_mode_failure, notes=notes)


def _text(value: Text | None) -> str:
    """A comment or message as text (YAML reads `comment: 42` as a number)."""
    return "" if value is None else str(value)


def _switch(value: bool | str, what: str) -> bool:
    """Salt's true/false for changes and result; its "Random" refused, by name."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() == "random":
        raise StateError(f"{what}: 'Random' is not supported here: a state reports the same on every run "
                         f"(write {what}: true or {what}: false)")
    raise StateError(f"{what} must be true or false, not {value!r}")
