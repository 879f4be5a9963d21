"""file.managed keeps old versions under the agent's state dir, but not without bound."""

from piagent.engine import run_states


def test_backups_keep_the_original_and_the_newest_versions_only(tmp):
    target = tmp / "app.conf"
    target.write_text("original\n")
    state_dir = tmp / "agent"
    for i in range(15):
        (res,) = run_states([{"id": str(target), "fun": "file.managed", "name": str(target),
                              "args": {"contents": f"version {i}\n"}}], state_dir=str(state_dir))
        assert res["status"] == "changed", res
    backups = sorted((state_dir / "backup").rglob("app.conf.*"), key=lambda p: p.stat().st_mtime)
    contents = [p.read_text() for p in backups]
    assert len(backups) == 10
    assert "original\n" in contents              # the file as it was before pimaster touched it
    assert "version 13\n" in contents             # and the latest replaced versions
    assert target.read_text() == "version 14\n"
