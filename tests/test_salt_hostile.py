"""Salt's layer against a root-compromised Pi: grains that select files cannot make one node pass
for another, no node's pillar reaches another's rendering, and data a node chose (facts, a stage's
results) cannot set state arguments through `names:`, exhaust the master through `load_yaml` or a
regular expression, or abort the apply. Rendering level, with contexts built as jobs.Plan builds
them; the pillar test runs a real master and agents."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

import pytest

from harness import wait_for
from pimaster.render import StateFileErrors, compile_for_node
from pimaster.salt import salt_context
from pimaster.statetree import state_tree
from piagent.states import catalog

CATALOG = catalog()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def render(path: Path, context: dict) -> list[dict]:
    return compile_for_node(str(path), context, CATALOG, tree=state_tree(str(path.parent)))


def refused(path: Path, context: dict) -> str:
    with pytest.raises(StateFileErrors) as caught:
        render(path, context)
    return "\n".join(map(str, caught.value.errors))


def hostile_context(results=None) -> dict:
    """hostile01 reporting good02's name, fqdn and address, and an os-release ID with dots."""
    facts = {"hostname": "good02", "fqdn": "good02.lab", "ips": ["10.0.0.2", "10.0.0.66"],
             "os": {"ID": "private.node02"}}
    entry = {"id": "hostile01", "hostname": "hostile01", "ip": "10.0.0.66"}
    context = {"node": entry, "nodes": [], "cluster": {}, "results": results or {}}
    context.update(salt_context(facts, entry, {}, {}, claimed={"good02", "10.0.0.2"}))
    return context


def test_grains_that_select_files_name_the_node_itself_never_the_one_it_claims_to_be(tmp_path):
    grains = hostile_context()["grains"]
    assert (grains["id"], grains["nodename"], grains["host"], grains["fqdn"]) == ("hostile01",) * 4
    assert grains["ipv4"] == ["10.0.0.66"] and "os" not in grains
    write(tmp_path / "certs" / "good02.key", "GOOD02-PRIVATE-KEY\n")
    write(tmp_path / "certs" / "default.key", "default\n")
    state = write(tmp_path / "site.sls", """
        key:
          file.managed:
            - name: /etc/ssl/node.key
            - source: [salt://certs/{{ grains.fqdn }}.key, salt://certs/default.key]
        """)
    assert render(state, hostile_context())[0]["args"]["contents"] == "default\n"


def test_names_from_data_give_names_never_arguments(tmp_path):
    stolen = [{"eve": [{"groups": ["sudo"]}, {"password": "$6$attacker$xyz"}]}]
    state = write(tmp_path / "users.sls", """
        people:
          user.present:
            - names: {{ results.cp01 }}
        """)
    assert "names: a {{ }} value gives names (strings), not a name with arguments" in refused(
        state, hostile_context({"cp01": stolen}))
    one = write(tmp_path / "one.sls", """
        people:
          user.present:
            - names:
              - {{ results.cp01[0] }}
        """)
    assert "not a name with arguments" in refused(one, hostile_context({"cp01": stolen}))
    renamed = write(tmp_path / "renamed.sls", """
        people:
          user.present:
            - names:
              - alice:
                - name: root
        """)
    assert "(and not `name`)" in refused(renamed, hostile_context())
    plain = write(tmp_path / "plain.sls", "people:\n  user.present:\n    - names: {{ results.cp01 }}\n")
    assert [s["name"] for s in render(plain, hostile_context({"cp01": ["bob", "carol"]}))] == ["bob", "carol"]


def test_yaml_a_node_chose_cannot_fill_the_masters_memory_or_hold_itself(tmp_path):
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 12))
    state = write(tmp_path / "bomb.sls", """
        {% set info = results.cp01 | load_yaml %}
        show:
          cmd.run:
            - name: echo {{ info | length }}
        """)
    started = time.monotonic()
    assert "expands to over 100000 values" in refused(state, hostile_context({"cp01": bomb}))
    assert "holds itself" in refused(state, hostile_context({"cp01": "&a [*a, 1]"}))
    print(f"alias bomb refused in {time.monotonic() - started:.2f} s")


def test_a_regular_expression_looks_at_bounded_text(tmp_path):
    state = write(tmp_path / "re.sls", """
        {% set v = results.cp01 | regex_search('(\\\\d+)\\\\.(\\\\d+)') %}
        show:
          cmd.run:
            - name: echo {{ v }}
        """)
    assert "over the 16384 a regular expression may look at" in refused(state, hostile_context({"cp01": "1" * 100_000}))
    assert render(state, hostile_context({"cp01": "v 12.4"}))[0]["name"] == "echo ('12', '4')"


def test_keys_built_in_the_file_find_the_pillar_and_context_overrides_defaults(tmp_path):
    context = hostile_context()
    context.update(salt_context({}, {"id": "n1"}, {}, {"chrony": {"lookup": {"server": "pool.corp"}}}))
    state = write(tmp_path / "chrony" / "init.sls", """
        {% set tplroot = tpldir.split('/')[0] %}
        conf:
          file.managed:
            - name: /etc/chrony.conf
            - source: salt://chrony/chrony.conf.j2
            - template: jinja
            - defaults:
                port: 80
                server: {{ salt['pillar.get'](tplroot ~ ':lookup:server', 'DEFAULT') }}
            - context:
                port: 8080
        """)
    write(tmp_path / "chrony" / "chrony.conf.j2", "server {{ server }} port {{ port }}\n")
    job = compile_for_node(str(state), context, CATALOG, tree=state_tree(str(tmp_path)))
    assert job[0]["args"]["contents"] == "server pool.corp port 8080\n"


def test_no_nodes_pillar_reaches_another_nodes_rendering(tmp, master, start_agent):
    config = master.token_config(uses=2)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    write(tmp / "site" / "cluster.yaml", """
        pillar:
          motd: hello
        nodes:
          - id: n2
            pillar:
              passphrase: N2-PILLAR-SECRET
        """)
    state = write(tmp / "site" / "dump.sls", f"""
        {tmp}/dump-{{{{ node.id }}}}:
          file.managed:
            - contents: "{{{{ nodes | map(attribute='pillar', default='-') | list | tojson }}}} {{{{ node.pillar | default('-') }}}} {{{{ pillar | tojson }}}}"
        """)
    result = master.cli("apply", str(state), "--json", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "N2-PILLAR-SECRET" not in (tmp / "dump-n1").read_text()
    assert (tmp / "dump-n2").read_text().strip().endswith(json.dumps({"motd": "hello", "passphrase": "N2-PILLAR-SECRET"},
                                                                      separators=(", ", ": ")))
