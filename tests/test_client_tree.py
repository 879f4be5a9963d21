"""`pimaster apply FILE` works wherever the client runs next to a master it can reach: the client
resolves FILE in its own file system and serves the state tree's files to the master, which may
see another one (the lab's node01, a service's private /tmp, another mount namespace).

Here the master runs in a mount namespace of its own (`unshare --mount`, as root) with an empty
tmpfs over the state tree, so it cannot read one file of it itself; the client and the agents run
outside it. Real master and agent processes, real ZeroMQ.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from harness import Master, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a mount namespace of the master's own needs root")


class HiddenTreeMaster(Master):
    """A master that cannot see ``hidden``: in its own mount namespace an empty tmpfs covers it."""

    def __init__(self, tmp: Path, hidden: Path) -> None:
        super().__init__(tmp)
        hidden.mkdir(parents=True, exist_ok=True)
        self.argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                     'mount -t tmpfs -o size=1m,mode=0700 pimaster-test "$0" && exec "$@"', str(hidden), *self.argv]

    def sees(self, path: Path) -> list[str]:
        """What the master's mount namespace shows in ``path``."""
        result = subprocess.run(["nsenter", "-t", str(self.proc.pid), "-m", "--", "ls", "-A", str(path)],
                                capture_output=True, text=True, timeout=10)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def site(tmp):
    """A state tree as a person writes one: an inventory with roles, an include, a Jinja macro
    file, a templated and a plain `source:`."""
    site = tmp / "site"
    out = tmp / "out"
    write(site / "cluster.yaml", """
        cluster:
          name: hidden-tree
        nodes:
          - id: n1
            roles: [web]
          - id: n2
            roles: [db]
        """)
    write(site / "common.yaml", f"""
        {out}/{{{{ node.id }}}}/common:
          file.managed:
            - contents: common to all
            - makedirs: true
        """)
    write(site / "macros.j2", """
        {% macro greet(name) %}hello {{ name }}{% endmacro %}
        """)
    write(site / "files" / "motd.j2", "{{ node.id }} is {{ node.roles | join(',') }} in {{ cluster.name }}\n")
    write(site / "files" / "plain.txt", "copied as it is {{ not rendered }}\n")
    write(site / "web.yaml", f"""
        {{% from 'macros.j2' import greet %}}
        include:
          - common
        {out}/{{{{ node.id }}}}/motd:
          file.managed:
            - source: salt://files/motd.j2
            - template: jinja
            - makedirs: true
        {out}/{{{{ node.id }}}}/plain:
          file.managed:
            - source: files/plain.txt
            - makedirs: true
        {out}/{{{{ node.id }}}}/greeting:
          file.managed:
            - contents: "{{{{ greet(node.id) }}}}"
            - makedirs: true
        """)
    return site


@pytest.fixture
def hidden_cluster(tmp, processes, start_agent, site):
    master = HiddenTreeMaster(tmp, site).start()
    processes.append(master)
    config = master.token_config(uses=5)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    return master


def cli(master: Master, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`pimaster ARGS` run by a person in ``cwd``, outside the master's mount namespace."""
    return subprocess.run([master.python, "-m", "pimaster", *args, "--state-dir", str(master.state_dir)],
                          capture_output=True, text=True, env=master.env, cwd=cwd, timeout=300)


def test_apply_of_a_relative_path_the_master_cannot_see_renders_from_the_clients_files(tmp, hidden_cluster, site):
    master = hidden_cluster
    assert master.sees(site) == [], "the test's master must not see the state tree"
    result = cli(master, "apply", "web.yaml", "--json", cwd=site)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["file"] == str(site / "web.yaml")
    assert all(n["ok"] and n["changed"] == 4 for n in report["nodes"].values()), report
    out = tmp / "out"
    assert (out / "n1" / "motd").read_text() == "n1 is web in hidden-tree\n"
    assert (out / "n2" / "motd").read_text() == "n2 is db in hidden-tree\n"
    assert (out / "n1" / "plain").read_text() == "copied as it is {{ not rendered }}\n"
    assert (out / "n1" / "greeting").read_text().strip() == "hello n1"
    assert (out / "n2" / "common").read_text().strip() == "common to all"

    # Roles of `ping` and `jobs` come from the inventory that apply read, which only the client could.
    ping = cli(master, "ping", "--target", "role:web", "--json", cwd=tmp)
    assert ping.returncode == 0, ping.stderr
    assert [n["id"] for n in json.loads(ping.stdout)["nodes"]] == ["n1"]
    jobs = cli(master, "jobs", "--target", "role:db", "--json", cwd=tmp)
    assert jobs.returncode == 0 and [j["id"] for j in json.loads(jobs.stdout)["jobs"]] == [report["job"]], jobs

    # A second run, from elsewhere and by absolute path, changes nothing.
    again = cli(master, "apply", str(site / "web.yaml"), "--json", cwd=tmp)
    assert again.returncode == 0 and all(n["changed"] == 0 for n in json.loads(again.stdout)["nodes"].values())


def test_the_client_serves_nothing_outside_the_tree_nor_from_the_masters_state_dir(tmp, hidden_cluster, site):
    master = hidden_cluster
    write(tmp / "outside.txt", "not part of the tree\n")
    (site / "files" / "escape").symlink_to(tmp / "outside.txt")
    (site / "files" / "stolen").symlink_to(master.state_dir / "master.key")
    cases = [  # (tree, source, why)
        (site, "../outside.txt", f"is outside the state tree {site}"),
        (site, "files/escape", f"is outside the state tree {site}"),
        (site, "files/stolen", f"is outside the state tree {site}"),
        # A tree holding the master's state directory (a state file put next to it): still not its keys.
        (tmp, "master/master.key", f"is in {master.state_dir}, which state files may not read"),
        (tmp, "site/files/stolen", f"is in {master.state_dir}, which state files may not read"),
    ]
    for number, (tree, source, why) in enumerate(cases):
        write(tree / f"case{number}.yaml", f"""
            steal:
              file.managed:
                - name: {tmp}/out/{{{{ node.id }}}}/case{number}
                - source: {source}
            """)
        result = cli(master, "apply", f"case{number}.yaml", "--json", cwd=tree)
        assert result.returncode == 2, (source, result.stdout, result.stderr)
        error = json.loads(result.stdout)["error"]
        assert error == f"refused, nothing was sent:\ncase{number}.yaml:4: steal: source {source!r} {why}", error
    assert not (tmp / "out").exists()  # nothing reached a node
    assert json.loads(cli(master, "jobs", "--json", cwd=tmp).stdout)["jobs"] == []


def test_a_source_too_large_to_push_is_refused_by_name(tmp, hidden_cluster, site):
    master = hidden_cluster
    big = site / "files" / "big.img"
    with open(big, "wb") as fh:
        fh.truncate(17 * 1024 * 1024)  # sparse: more than a job message to a node can carry
    write(site / "big.yaml", f"""
        {tmp}/out/{{{{ node.id }}}}/big:
          file.managed:
            - source: files/big.img
        """)
    result = cli(master, "apply", "big.yaml", "--json", cwd=site)
    assert result.returncode == 2, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert "files/big.img: cannot read: larger than 16 MiB" in error, error


def test_clients_that_never_answer_hold_only_their_own_applies(tmp, hidden_cluster, site):
    """Eight `apply` requests whose client never answers the master's questions: `ping` by role
    (whose roles the master works out in a thread) and `status` still answer at once."""
    import socket

    master = hidden_cluster
    assert cli(master, "apply", "web.yaml", "--json", cwd=site).returncode == 0  # roles to target by
    stalled = []
    try:
        for _ in range(8):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(master.state_dir / "control.sock"))
            sock.sendall(json.dumps({"cmd": "apply", "args": {"file": str(site / "web.yaml"), "root": str(site),
                                                              "timeout": 30}}).encode() + b"\n")
            stalled.append(sock)
        # Renderings have threads of their own (4): those are all waiting on these clients' answers.
        asked = 0
        for sock in stalled:
            sock.settimeout(10 if asked < 4 else 0.5)
            try:
                asked += sock.recv(4096).startswith(b'{"ask"')
            except TimeoutError:
                pass
        assert asked == 4
        ping = subprocess.run([master.python, "-m", "pimaster", "ping", "--target", "role:web", "--json",
                               "--state-dir", str(master.state_dir)], capture_output=True, text=True,
                              env=master.env, timeout=60)
        assert ping.returncode == 0, ping.stderr
        assert [n["id"] for n in json.loads(ping.stdout)["nodes"]] == ["n1"]
    finally:
        for sock in stalled:
            sock.close()
    # Their applies end (the client has gone) and nothing of them reached a node.
    wait_for(lambda: len(json.loads(cli(master, "jobs", "--json", cwd=tmp).stdout)["jobs"]) == 1, 30,
             what="only the first apply to be a job")


def test_the_master_asks_nothing_outside_the_tree_and_the_client_opens_only_regular_files(tmp):
    """Unit level: ClientTree's own checks (whatever the client would answer), serve_tree_file's."""
    import threading

    from pimaster.statetree import ClientTree, serve_tree_file, state_tree

    asked = []
    tree = ClientTree("/", lambda path, timeout: asked.append(path) or ({"kind": "missing"}, b""),
                      forbidden=(str(tmp / "master"),))
    for path in (f"/{tmp}/master/master.key", f"{tmp}/master/../master/master.key"):
        assert tree.refusal(path, "source") == f"source is in {tmp}/master, which state files may not read"
    assert asked == []
    site = tmp / "site"
    site.mkdir()
    fifo = site / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: open(fifo, "w").close(), daemon=True)
    writer.start()  # blocks until someone opens the FIFO for reading
    local = state_tree(str(site))
    assert serve_tree_file(local, str(fifo))[0] == {"kind": "missing"}
    writer.join(0.5)
    assert writer.is_alive(), "the client opened the FIFO"
    open(fifo).close()  # let the writer go
    writer.join(5)
    assert serve_tree_file(local, f"{site}/a\0b")[0]["kind"] == "error"
