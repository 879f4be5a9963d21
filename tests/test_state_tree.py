"""State trees as Salt lays them out: a root, SLS names from it (`include: a.b`, `salt://a/f`,
`{% from "a/map.jinja" import … %}`), each file included once, conflicting ids refused, and the
state arguments Salt users write (`names:`, `extend:`, `- sls:` requisites, `source:` lists,
`context:`/`defaults:`, `contents_pillar`). Rendering only: no daemon needed."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from pimaster.render import StateFileErrors, compile_for_node
from pimaster.statetree import StateFileError, resolve_state_file, sls_name, state_tree
from piagent.states import catalog

CATALOG = catalog()
CONTEXT = {"node": {"id": "n1", "hostname": "n1", "roles": []}, "nodes": [], "cluster": {},
           "pillar": {"motd": {"text": "from the pillar"}, "lines": ["one", "two"]}}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def compile(path: Path, root: Path, context: dict | None = None) -> list[dict]:
    return compile_for_node(str(path), dict(CONTEXT, **(context or {})), CATALOG,
                            tree=state_tree(str(root)))


def errors_of(path: Path, root: Path, context: dict | None = None) -> list[str]:
    with pytest.raises(StateFileErrors) as caught:
        compile(path, root, context)
    return [str(e) for e in caught.value.errors]


@pytest.fixture
def tree(tmp_path) -> Path:
    """A formula tree: ntp/init.sls including ntp.conf, a map.jinja, salt:// files."""
    root = tmp_path / "srv"
    write(root / "top.sls", "base:\n  '*':\n    - ntp\n")
    write(root / "ntp" / "map.jinja", """
        {% set ntp = {'service': 'chrony', 'conf': '/etc/chrony/chrony.conf'} %}
        """)
    write(root / "ntp" / "init.sls", """
        {% from "ntp/map.jinja" import ntp %}
        include:
          - ntp.conf
        ntp-service:
          service.running:
            - name: {{ ntp.service }}
            - require:
              - sls: ntp.conf
        """)
    write(root / "ntp" / "conf.sls", """
        {% from "./map.jinja" import ntp %}
        ntp-conf:
          file.managed:
            - name: {{ ntp.conf }}
            - source: salt://ntp/files/chrony.conf.j2
            - template: jinja
            - defaults:
                server: pool.ntp.org
            - context:
                iburst: true
        """)
    write(root / "ntp" / "files" / "chrony.conf.j2", "server {{ server }}{% if iburst %} iburst{% endif %}\n")
    return root


def test_a_nested_formula_resolves_includes_imports_and_salt_sources_from_the_root(tree):
    job = compile(tree / "ntp" / "init.sls", tree)
    assert [s["id"] for s in job] == ["ntp-conf", "ntp-service"]
    assert job[0]["args"]["contents"] == "server pool.ntp.org iburst\n"
    assert job[1]["name"] == "chrony"
    assert job[1]["require"] == [0]  # `- sls: ntp.conf`: every state of that file


def test_sls_names_and_tree_roots_resolve_as_salt_does(tree, tmp_path):
    assert sls_name(str(tree / "ntp" / "init.sls"), str(tree)) == "ntp"
    assert sls_name(str(tree / "ntp" / "conf.sls"), str(tree)) == "ntp.conf"
    # A path: the tree is the nearest directory above holding top.sls or cluster.yaml.
    assert resolve_state_file("ntp/conf.sls", None, str(tree)) == (str(tree / "ntp" / "conf.sls"), str(tree))
    assert resolve_state_file(str(tree / "ntp"), None) == (str(tree / "ntp" / "init.sls"), str(tree))
    # An SLS name in --tree.
    assert resolve_state_file("ntp.conf", None, str(tmp_path), tree="srv") == (str(tree / "ntp" / "conf.sls"), str(tree))
    assert resolve_state_file("ntp", None, "/", tree=str(tree)) == (str(tree / "ntp" / "init.sls"), str(tree))
    with pytest.raises(StateFileError, match="no such state file, nor an SLS of that name in the state tree"):
        resolve_state_file("ntp.server", None, "/", tree=str(tree))
    # A file outside the tree named by --tree.
    outside = write(tmp_path / "elsewhere.yaml", "a:\n  cmd.run: []\n")
    with pytest.raises(StateFileError, match="is outside the state tree"):
        resolve_state_file(str(outside), None, "/", tree=str(tree))
    # A single file with no marker above it is its own tree.
    lone = write(tmp_path / "lone" / "x.yaml", "a:\n  cmd.run: []\n")
    assert resolve_state_file(str(lone), None) == (str(lone), str(tmp_path / "lone"))


def test_a_file_included_from_two_places_runs_once_and_files_may_include_each_other(tmp_path):
    write(tmp_path / "base.sls", "base-pkg:\n  pkg.installed:\n    - name: vim\n")
    write(tmp_path / "left.sls", "include: [base, right]\nleft:\n  cmd.run:\n    - name: echo left\n")
    write(tmp_path / "right.sls", "include: [base, left]\nright:\n  cmd.run:\n    - name: echo right\n")
    top = write(tmp_path / "top.yaml", "include: [left, right]\ntop:\n  cmd.run:\n    - name: echo top\n")
    ids = [s["id"] for s in compile(top, tmp_path)]
    assert sorted(ids) == ["base-pkg", "left", "right", "top"] and ids[-1] == "top"


def test_the_same_id_in_two_files_is_a_conflict_and_extend_is_how_to_change_it(tmp_path):
    write(tmp_path / "web.sls", "nginx:\n  pkg.installed: []\n  service.running:\n    - enable: true\n")
    clash = write(tmp_path / "clash.sls", "include: [web]\nnginx:\n  pkg.installed: []\n")
    assert errors_of(clash, tmp_path) == [
        "clash.sls:3: conflicting ID 'nginx': also at web.sls:2 (a file changes a state of another with `extend:`)"]
    change = write(tmp_path / "change.sls", """
        include: [web]
        extend:
          nginx:
            service:
              - enable: false
              - require:
                - cmd: tuned
        tuned:
          cmd.run:
            - name: echo tuned
        """)
    job = compile(change, tmp_path)
    service = next(s for s in job if s["fun"] == "service.running")
    assert service["args"]["enable"] is False
    assert service["require"] == [next(i for i, s in enumerate(job) if s["id"] == "tuned")]
    missing = write(tmp_path / "missing.sls", "extend:\n  apache:\n    service:\n      - enable: false\n")
    assert "extend: no state 'apache' with a service function" in errors_of(missing, tmp_path)[0]


def test_names_makes_one_state_per_name(tmp_path):
    path = write(tmp_path / "pkgs.sls", """
        tools:
          pkg.installed:
            - names:
              - vim
              - htop
        dirs:
          file.directory:
            - makedirs: true
            - names:
              - /srv/a
              - /srv/b:
                - mode: "0700"
        """)
    job = compile(path, tmp_path)
    assert [(s["id"], s["name"]) for s in job] == [("tools", "vim"), ("tools", "htop"), ("dirs", "/srv/a"),
                                                    ("dirs", "/srv/b")]
    assert job[3]["args"]["mode"] == "0700" and "mode" not in job[2]["args"]
    both = write(tmp_path / "both.sls", "x:\n  pkg.installed:\n    - name: vim\n    - names: [htop]\n")
    assert errors_of(both, tmp_path) == ["both.sls:4: x: give `name` or `names`, not both"]


def test_relative_includes_and_a_list_of_sources(tmp_path):
    write(tmp_path / "app" / "common.sls", "common:\n  cmd.run:\n    - name: echo common\n")
    write(tmp_path / "app" / "files" / "b.conf", "the second\n")
    path = write(tmp_path / "app" / "server.sls", """
        include:
          - .common
        conf:
          file.managed:
            - name: /etc/app.conf
            - source:
              - salt://app/files/a.conf
              - salt://app/files/b.conf
        """)
    job = compile(path, tmp_path)
    assert [s["id"] for s in job] == ["common", "conf"] and job[1]["args"]["contents"] == "the second\n"
    none = write(tmp_path / "app" / "none.sls", "c:\n  file.managed:\n    - name: /x\n    - source: [salt://x, salt://y]\n")
    assert errors_of(none, tmp_path) == ["app/none.sls:4: c: none of the sources exists (x, y)"]
    up = write(tmp_path / "app" / "up.sls", "include:\n  - ...common\n")
    assert "goes above the state tree" in errors_of(up, tmp_path)[0]


def test_a_salt_source_is_found_from_the_root_and_a_missing_one_is_named_as_it_is_looked_for(tmp_path):
    write(tmp_path / "web" / "files" / "index.html", "hello\n")
    good = write(tmp_path / "web" / "init.sls", "index:\n  file.managed:\n    - name: /srv/index.html\n"
                                                "    - source: salt://web/files/index.html\n")
    assert compile(good, tmp_path)[0]["args"]["contents"] == "hello\n"
    bad = write(tmp_path / "web" / "bad.sls", "index:\n  file.managed:\n    - name: /srv/index.html\n"
                                              "    - source: salt://web/files/missing.html\n")
    assert errors_of(bad, tmp_path) == ["web/bad.sls:4: index: source 'salt://web/files/missing.html' not found "
                                        "(web/files/missing.html)"]


def test_contents_pillar_reads_the_nodes_pillar(tmp_path):
    path = write(tmp_path / "motd.sls", """
        motd:
          file.managed:
            - name: /etc/motd
            - contents_pillar: motd:text
        lines:
          file.managed:
            - name: /etc/lines
            - contents_pillar: lines
        """)
    job = compile(path, tmp_path)
    assert job[0]["args"]["contents"] == "from the pillar" and job[1]["args"]["contents"] == "one\ntwo\n"
    missing = write(tmp_path / "missing.sls", "m:\n  file.managed:\n    - name: /x\n    - contents_pillar: motd:nope\n")
    assert errors_of(missing, tmp_path) == ["missing.sls:4: m: contents_pillar 'motd:nope': the node's pillar has "
                                            "no such key"]


def test_salts_dot_spelling_and_errors_name_no_internal_class(tmp_path):
    from pimaster.salt import salt_context

    context = salt_context({"hostname": "n1"}, {"id": "n1"}, {}, {"ntp": {"server": "pool.example"}})
    path = write(tmp_path / "dots.sls", "a:\n  cmd.run:\n    - name: echo {{ salt.pillar.get('ntp:server') }} "
                                        "{{ salt.grains.get('id') }}\n")
    assert compile(path, tmp_path, context)[0]["name"] == "echo pool.example n1"
    run = write(tmp_path / "run.sls", "a:\n  cmd.run:\n    - name: {{ salt.cmd.run('whoami') }}\n")
    assert "salt['cmd.run'] cannot be called here" in errors_of(run, tmp_path, context)[0]
    sums = write(tmp_path / "sums.sls", "a:\n  cmd.run:\n    - name: echo {{ node + 1 }}\n")
    error = errors_of(sums, tmp_path)[0]
    assert "'dict' and 'int'" in error and "AttrDict" not in error, error


def test_an_sls_requisite_covers_what_that_sls_includes_and_salt_only_arguments_say_what_to_use(tmp_path):
    write(tmp_path / "app" / "init.sls", "include: [.pkgs, .conf]\n")
    write(tmp_path / "app" / "pkgs.sls", "app-pkg:\n  pkg.installed:\n    - name: nginx\n")
    write(tmp_path / "app" / "conf.sls", "app-conf:\n  file.managed:\n    - name: /etc/app\n    - contents: x\n")
    site = write(tmp_path / "site.sls", """
        include: [app]
        smoke:
          cmd.run:
            - name: curl -fs localhost
            - require:
              - sls: app
        """)
    job = compile(site, tmp_path)
    assert [s["id"] for s in job] == ["app-pkg", "app-conf", "smoke"] and job[2]["require"] == [0, 1]
    salty = write(tmp_path / "salty.sls", "x:\n  cmd.run:\n    - name: 'true'\n    - require_any:\n      - cmd: y\n"
                                          "y:\n  cmd.run:\n    - name: 'true'\n    - hide_output: true\n")
    assert errors_of(salty, tmp_path) == [
        "salty.sls:4: x: Salt's `require_any` is not supported here: pimaster's requisites wait for all the states "
        "named; `onchanges` and `onfail` already fire on any",
        "salty.sls:9: y: Salt's `hide_output` is not supported here: use `sensitive: true` to keep a state's output "
        "out of results and logs"]
    top = write(tmp_path / "top.sls", "base:\n  '*':\n    - app\n")
    with pytest.raises(StateFileError, match="Salt's top file, which pimaster does not read"):
        resolve_state_file(str(top), None)
    remote = write(tmp_path / "remote.sls", "r:\n  file.managed:\n    - name: /x\n    - source: https://example.com/x\n")
    assert "https:// sources are not supported" in errors_of(remote, tmp_path)[0]


def test_a_formula_tree_applied_on_loopback_by_its_sls_name_converges_and_then_changes_nothing(tmp, master,
                                                                                               start_agent):
    """Real master and agents: a formula (map.jinja with grains.filter_by and pillar.get, a diamond
    of includes, names:, context:, a salt:// template) applied as `pimaster apply motd --tree site`."""
    import json
    import subprocess

    from harness import wait_for

    config = master.token_config(uses=2)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    out, site = tmp / "out", tmp / "site"
    write(site / "cluster.yaml", """
        pillar:
          motd:
            banner: Welcome
        nodes:
          - id: n2
            pillar:
              motd:
                banner: Hello n2
        """)
    write(site / "motd" / "map.jinja", """
        {% set motd = salt['grains.filter_by']({'Debian': {'dir': 'debian'}, 'default': {'dir': 'other'}},
                                               grain='os_family', default='default') %}
        {% do motd.update(salt['pillar.get']('motd', {})) %}
        """)
    write(site / "motd" / "base.sls", f"""
        {out}/{{{{ grains.id }}}}:
          file.directory:
            - makedirs: true
        """)
    write(site / "motd" / "left.sls", "include: [.base]\n")
    write(site / "motd" / "right.sls", "include: [motd.base]\n")
    write(site / "motd" / "files" / "motd.j2", "{{ banner }} from {{ grains.id }} ({{ flavour }})\n")
    write(site / "motd" / "init.sls", f"""
        {{% from "motd/map.jinja" import motd with context %}}
        include: [.left, .right]
        banner:
          file.managed:
            - name: {out}/{{{{ grains.id }}}}/motd
            - source: salt://motd/files/motd.j2
            - template: jinja
            - context:
                banner: {{{{ motd.banner }}}}
                flavour: {{{{ motd.dir }}}}
            - require:
              - sls: motd.base
        marks:
          file.managed:
            - contents: mark
            - names:
              - {out}/{{{{ grains.id }}}}/a
              - {out}/{{{{ grains.id }}}}/b
            - require:
              - file: banner
        """)
    apply = lambda: subprocess.run([master.python, "-m", "pimaster", "apply", "motd", "--tree", "site", "--json",
                                    "--state-dir", str(master.state_dir)], capture_output=True, text=True,
                                   env=master.env, cwd=tmp, timeout=120)
    first = apply()
    assert first.returncode == 0, first.stdout + first.stderr
    report = json.loads(first.stdout)
    assert {n: r["changed"] for n, r in report["nodes"].items()} == {"n1": 4, "n2": 4}, report
    # The flavour is filter_by's pick for this machine's os_family (debian here, other elsewhere).
    assert re.fullmatch(r"Welcome from n1 \((debian|other)\)\n", (out / "n1" / "motd").read_text())
    assert (out / "n2" / "motd").read_text().startswith("Hello n2 from n2 (")
    assert (out / "n1" / "a").read_text().strip() == "mark" and (out / "n2" / "b").exists()
    second = json.loads(apply().stdout)
    assert all(r["ok"] and r["changed"] == 0 for r in second["nodes"].values()), second
