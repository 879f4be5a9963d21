"""Salt's Jinja context and extensions (issue 15, items 2 and 3): `grains`, `pillar`, `opts`,
`salt[...]`, the per-file names, `{% do %}`, `{% import_yaml %}` and friends, and Salt's filters,
so that formulas render unchanged; and facts (hostile data) stay values through every one of them.

Rendering only (master/render.py's compile_for_node on trees written here, the agent's own
catalogue); the contexts are built as master/jobs.py builds them: pimaster's names with
salt.salt_context's on top, and salt.file_context per file.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import yaml

from piagent.states import catalog
from pimaster.render import Pending, StateFileErrors, compile_for_node, render_template, to_attrdict
from pimaster.salt import SaltFunctions, TemplateRefusal, file_context, grains_from_facts, salt_context
from pimaster.statetree import state_tree

CATALOG = catalog()
# Without argument types: for the tests that carry values of every type in cmd.run's arguments.
UNTYPED = {fun: {k: v for k, v in spec.items() if k != "types"} for fun, spec in CATALOG.items()}
BOOKWORM = {"ID": "debian", "VERSION_ID": "12", "VERSION_CODENAME": "bookworm",
            "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"}
# What a lying node might report (the schema refuses most of this; rendering must not rely on it).
HOSTILE = ["x\nevil: true", "{{ 7*7 }}", "a: [1, 2]", "- item", "pmv0123456789abx0y"]


def facts(**extra) -> dict:
    base = {"hostname": "node01", "fqdn": "node01.cluster.lan", "machine_id": "ab" * 16,
            "pi_model": "Raspberry Pi 4 Model B Rev 1.4",
            "interfaces": [{"name": "eth0", "mac": "dc:a6:32:00:00:01", "addresses": ["10.77.0.11/24", "fe80::1/64"]},
                           {"name": "wlan0", "mac": None, "addresses": []}],
            "macs": ["dc:a6:32:00:00:01"], "ips": ["10.77.0.11", "fe80::1"], "cpu_count": 4, "memory_mb": 3794,
            "os": BOOKWORM, "arch": "arm64", "machine": "aarch64", "kernel": "6.6.31+rpt-rpi-v8",
            "boot_dir": "/boot/firmware", "systemd": True, "virtualization": "none", "agent_version": "0.1.0"}
    base.update(extra)
    return base


def context_for(node_facts: dict, entry: dict | None = None, pillar: dict | None = None) -> dict:
    """What Plan.render gives compile_for_node for one node (file_context is added per file)."""
    entry = dict({"id": "node01", "hostname": "node01", "roles": []}, **(entry or {}))
    node = dict(node_facts, **entry, facts=node_facts)
    return {"node": node, "nodes": [node], "cluster": {}, "results": Pending(),
            "secret": lambda name, length=64: "5ec2e7" * 4,
            **salt_context(node_facts, entry, {}, pillar or {})}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def compile_file(root: Path, name: str, context: dict, catalog: dict = CATALOG) -> list[dict]:
    path = root / name
    ctx = dict(context, **file_context(str(path), str(root)))
    return compile_for_node(str(path), ctx, catalog, tree=state_tree(str(root)))


def compile_text(root: Path, text: str, context: dict | None = None, catalog: dict = CATALOG) -> list[dict]:
    write(root / "s.sls", text)
    return compile_file(root, "s.sls", context if context is not None else context_for(facts()), catalog)


def refused(root: Path, text: str, context: dict | None = None, name: str = "s.sls") -> str:
    write(root / name, text)
    with pytest.raises(StateFileErrors) as caught:
        compile_file(root, name, context if context is not None else context_for(facts()))
    return str(caught.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(textwrap.dedent(text).lstrip("\n").splitlines(), 1) if needle in line)


def by_id(job: list[dict]) -> dict[str, dict]:
    return {s["id"]: s for s in job}


# ---------------------------------------------------------------------------------------------
# grains, pillar, opts, the per-file names

def test_grains_have_salts_names_built_from_the_facts():
    grains = grains_from_facts(facts(), "node01")
    assert grains == {
        "id": "node01", "kernel": "Linux", "nodename": "node01", "localhost": "node01",
        "fqdn": "node01.cluster.lan", "host": "node01", "domain": "cluster.lan",
        "os": "Debian", "os_family": "Debian", "lsb_distrib_id": "Debian", "oscodename": "bookworm",
        "lsb_distrib_codename": "bookworm", "osrelease": "12", "lsb_distrib_release": "12",
        "osrelease_info": [12], "osmajorrelease": 12, "osfinger": "Debian-12",
        "osarch": "arm64", "cpuarch": "aarch64", "kernelrelease": "6.6.31+rpt-rpi-v8", "num_cpus": 4,
        "mem_total": 3794, "machine_id": "ab" * 16, "ipv4": ["10.77.0.11"], "ipv6": ["fe80::1"],
        "ip4_interfaces": {"eth0": ["10.77.0.11"], "wlan0": []}, "ip6_interfaces": {"eth0": ["fe80::1"], "wlan0": []},
        "ip_interfaces": {"eth0": ["10.77.0.11", "fe80::1"], "wlan0": []},
        "hwaddr_interfaces": {"eth0": "dc:a6:32:00:00:01"}, "virtual": "physical", "init": "systemd"}


@pytest.mark.parametrize("release, expected", [
    ({"ID": "raspbian", "VERSION_ID": "11", "VERSION_CODENAME": "bullseye"},
     {"os": "Raspbian", "os_family": "Debian", "osfinger": "Raspbian-11", "oscodename": "bullseye"}),
    ({"ID": "ubuntu", "VERSION_ID": "22.04"},
     {"os": "Ubuntu", "os_family": "Debian", "osfinger": "Ubuntu-22.04", "osrelease_info": [22, 4]}),
    ({"ID": "fedora", "VERSION_ID": "40"}, {"os": "Fedora", "os_family": "RedHat", "osfinger": "Fedora-40"}),
    ({"ID": "plan9"}, {"os": "plan9", "os_family": "plan9"}),
])
def test_os_grains_follow_salts_names(release, expected):
    grains = grains_from_facts(facts(os=release), "n")
    assert {k: grains[k] for k in expected} == expected


def test_a_grain_nothing_tells_is_absent():
    grains = grains_from_facts({"hostname": "n1"}, "n1")
    assert grains == {"id": "n1", "kernel": "Linux", "nodename": "n1", "localhost": "n1", "fqdn": "n1",
                      "host": "n1", "domain": ""}
    lab = grains_from_facts(facts(virtualization="systemd-nspawn", systemd=False), "n")
    assert lab["virtual"] == "systemd-nspawn" and "init" not in lab
    assert grains_from_facts(facts(virtualization="lxc"), "n")["virtual_subtype"] == "LXC"


def test_pillar_is_the_inventory_block_with_the_entrys_own_on_top():
    top = {"ntp": {"servers": ["a", "b"], "lookup": {"pkg": "chrony"}}, "motd": "hello"}
    entry = {"id": "node02", "pillar": {"ntp": {"servers": ["c"], "lookup": {"service": "chronyd"}}}}
    before = json.dumps([top, entry])
    ctx = salt_context(facts(), entry, {"name": "picluster"}, top)
    assert ctx["pillar"] == {"ntp": {"servers": ["c"], "lookup": {"pkg": "chrony", "service": "chronyd"}},
                             "motd": "hello"}
    assert json.dumps([top, entry]) == before  # the inventory's data is not changed
    assert ctx["opts"] == {"id": "node02", "file_client": "local", "renderer": "jinja|yaml", "saltenv": "base"}
    assert ctx["grains"]["id"] == "node02" and ctx["saltenv"] == "base"
    assert isinstance(ctx["salt"], SaltFunctions) and not isinstance(ctx["salt"], dict) and not callable(ctx["salt"])
    assert salt_context(facts(), {"id": "n"}, {}, None)["pillar"] == {}
    with pytest.raises(ValueError):
        salt_context(facts(), {"id": "n", "pillar": ["not", "a", "mapping"]}, {}, {})


@pytest.mark.parametrize("rel, sls_rel, expected", [
    ("ntp/init.sls", None,
     {"sls": "ntp", "slspath": "ntp", "tpldir": "ntp", "tplfile": "ntp/init.sls", "tpldot": "ntp"}),
    ("ntp/client.sls", None, {"sls": "ntp.client", "slspath": "ntp", "tpldir": "ntp", "tplfile": "ntp/client.sls"}),
    ("top.sls", None, {"sls": "top", "slspath": "", "tpldir": ".", "tpldot": "", "sls_path": ""}),
    ("a/b/c.yaml", None, {"sls": "a.b.c", "slspath": "a/b", "sls_path": "a_b", "slsdotpath": "a.b",
                          "slscolonpath": "a:b", "tpldir": "a/b", "tpldot": "a.b"}),
    ("ntp/files/chrony.conf.j2", "ntp/client.sls",
     {"sls": "ntp.client", "slspath": "ntp", "tpldir": "ntp/files", "tplfile": "ntp/files/chrony.conf.j2"}),
])
def test_file_context_gives_salts_names_for_a_file(tmp_path, rel, sls_rel, expected):
    names = file_context(str(tmp_path / rel), str(tmp_path), str(tmp_path / sls_rel) if sls_rel else None)
    assert {k: names[k] for k in expected} == expected
    assert names["tplpath"] == str(tmp_path / rel)  # Salt's: the full path of the file


# ---------------------------------------------------------------------------------------------
# salt[...]

def salt(pillar=None, node_facts=None) -> SaltFunctions:
    return salt_context(node_facts or facts(), {"id": "node01"}, {}, pillar or {})["salt"]


def test_pillar_get_grains_get_and_config_get_as_salt_has_them():
    s = salt({"ntp": {"servers": ["a", "b"], "opts": {"iburst": True}}, "users": [{"name": "pi"}, {"root": {"uid": 0}}],
              "ports": {80: "http"}, "os": "from pillar", "id": "from pillar"})
    assert s["pillar.get"]("ntp:servers") == ["a", "b"]
    assert s["pillar.get"]("ntp:servers:1") == "b"
    assert s["pillar.get"]("users:root:uid") == 0          # a name looks in the mappings a list holds
    assert s["pillar.get"]("ports:80") == "http"           # a YAML number key
    assert s["pillar.get"]("ntp:nope") == ""               # Salt's default default
    assert s["pillar.get"]("ntp:nope", ["x"]) == ["x"]
    assert s["pillar.get"]("ntp/servers", delimiter="/") == ["a", "b"]
    assert s["pillar.get"]("ntp", {"servers": ["z"], "pkg": "chrony"}, merge=True) == {
        "servers": ["a", "b"], "opts": {"iburst": True}, "pkg": "chrony"}
    assert s["pillar.get"]("ntp:servers", ["z"], merge=True) == ["z", "a", "b"]
    got = s["pillar.get"]("ntp")
    got["servers"].append("changed by a template")
    assert s["pillar.get"]("ntp:servers") == ["a", "b"]    # a copy each time
    assert s["grains.get"]("os_family") == "Debian"
    assert s["grains.get"]("ip4_interfaces:eth0:0") == "10.77.0.11"
    assert s["grains.get"]("nope", "d") == "d"
    # Salt's order: minion options, then grains, then pillar.
    assert s["config.get"]("id") == "node01" and s["config.get"]("os") == "Debian"
    assert s["config.get"]("ntp:servers") == ["a", "b"] and s["config.get"]("nope", 5) == 5
    assert s["config.get"]("os", omit_grains=True) == "from pillar"
    assert s["pillar.items"]()["os"] == "from pillar" and s["grains.items"]()["host"] == "node01"
    assert "pillar.get" in s and "cmd.run" not in s


def test_grains_filter_by_has_salts_semantics():
    s = salt()
    table = {"Debian": {"pkg": "chrony", "conf": {"a": 1}}, "RedHat": {"pkg": "chrony", "service": "chronyd"},
             "default": {"pkg": "ntp"}, "base": {"service": "chrony", "conf": {"b": 2}}}
    assert s["grains.filter_by"](table) == {"pkg": "chrony", "conf": {"a": 1}}
    assert s["grains.filter_by"](table, base="base") == {"pkg": "chrony", "service": "chrony", "conf": {"a": 1, "b": 2}}
    assert s["grains.filter_by"](table, merge={"pkg": "chrony-nts"}) == {"pkg": "chrony-nts", "conf": {"a": 1}}
    assert s["grains.filter_by"](table, grain="oscodename") == {"pkg": "ntp"}  # no bookworm entry: the default
    assert s["grains.filter_by"]({"Deb*": 1, "*": 2}) == 1             # keys are glob patterns
    assert s["grains.filter_by"]({"10.77.*": "lan"}, grain="ipv4") == "lan"  # a list grain: each item
    assert s["grains.filter_by"]({"x": 1}) is None
    assert s["grains.filter_by"]({"x": 1}, default="x") == 1
    assert s["grains.filter_by"]({"x": 1}, merge={"a": 1}) == {"a": 1}
    assert table["Debian"] == {"pkg": "chrony", "conf": {"a": 1}}       # the table is not changed
    with pytest.raises(TemplateRefusal, match="merge must be a mapping"):
        s["grains.filter_by"](table, merge=["x"])


def test_defaults_merge_update_and_deepcopy():
    s = salt()
    dest = {"a": {"x": 1, "l": [1]}, "b": 1}
    same = s["defaults.merge"](dest, {"a": {"y": 2, "l": [2]}, "c": 3})
    assert same is dest and dest == {"a": {"x": 1, "y": 2, "l": [2]}, "b": 1, "c": 3}
    copied = s["defaults.merge"](dest, {"a": {"l": [3]}}, merge_lists=True, in_place=False)
    assert copied["a"]["l"] == [2, 3] and dest["a"]["l"] == [2]
    nodes = {"n1": {"index": "foo"}, "n2": {"index": "bar", "extra": ["x"]}}
    s["defaults.update"](nodes, {"enabled": True, "extra": ["base"]})
    assert nodes == {"n1": {"index": "foo", "enabled": True, "extra": ["base"]},
                     "n2": {"index": "bar", "enabled": True, "extra": ["base", "x"]}}
    deep = s["defaults.deepcopy"](dest)
    deep["a"]["x"] = 99
    assert dest["a"]["x"] == 1


def test_a_formula_map_jinja_with_filter_by_pillar_get_and_import_yaml_renders_unchanged(tmp_path):
    """The shape of the community formulas: map.jinja merges defaults.yaml, an os_family table and
    the pillar; the state file imports it `with context` from `tpldir`."""
    write(tmp_path / "chrony/defaults.yaml", """
        chrony:
          pkg: chrony
          servers: [pool.ntp.org]
          options: {iburst: true}
        """)
    write(tmp_path / "chrony/map.jinja", """
        {%- import_yaml tpldir ~ "/defaults.yaml" as defaults %}
        {%- set os_family_map = salt['grains.filter_by']({
            'Debian': {'service': 'chrony', 'config': '/etc/chrony/chrony.conf'},
            'RedHat': {'service': 'chronyd', 'config': '/etc/chrony.conf'},
          }, grain='os_family', merge=salt['pillar.get']('chrony:lookup')) %}
        {%- do defaults.chrony.update(os_family_map) %}
        {%- set chrony = salt['pillar.get']('chrony', default=defaults.chrony, merge=True) %}
        """)
    write(tmp_path / "chrony/init.sls", """
        {% from tpldir ~ "/map.jinja" import chrony with context %}
        chrony:
          pkg.installed:
            - name: {{ chrony.pkg }}
          service.running:
            - name: {{ chrony.service }}
            - enable: true
            - watch:
              - file: chrony-conf
        chrony-conf:
          file.managed:
            - name: {{ chrony.config }}
            - contents: |
                {%- for server in chrony.servers %}
                server {{ server }}{{ ' iburst' if chrony.options.iburst }}
                {%- endfor %}
            - mode: "0644"
        {{ sls }}-done:
          cmd.run:
            - name: echo {{ grains['osfinger'] }} {{ salt['config.get']('id') }}
        """)
    pillar = {"chrony": {"servers": ["10.77.0.1"], "lookup": {"service": "chrony-custom"}}}
    job = by_id(compile_file(tmp_path, "chrony/init.sls", context_for(facts(), pillar=pillar)))
    assert list(job) == ["chrony", "chrony-conf", "chrony-done"]
    assert job["chrony"]["name"] == "chrony-custom" and job["chrony"]["fun"] == "service.running"
    assert job["chrony-conf"]["name"] == "/etc/chrony/chrony.conf"
    assert job["chrony-conf"]["args"]["contents"] == "server 10.77.0.1 iburst\n"
    assert job["chrony-done"]["name"] == "echo Debian-12 node01"
    fedora_facts = facts(os={"ID": "fedora", "VERSION_ID": "40"})
    fedora = by_id(compile_file(tmp_path, "chrony/init.sls", context_for(fedora_facts)))
    assert fedora["chrony"]["name"] == "chronyd" and fedora["chrony-conf"]["name"] == "/etc/chrony.conf"
    assert fedora["chrony-conf"]["args"]["contents"] == "server pool.ntp.org iburst\n"


def test_defaults_get_reads_the_formulas_defaults_file_in_the_tree(tmp_path):
    write(tmp_path / "ntp/defaults.yaml", "servers: [a, b]\nopts: {x: 1}\n")
    write(tmp_path / "motd/defaults.json", '{"text": "hi"}')
    job = compile_text(tmp_path, """
        a:
          cmd.run:
            - name: x
            - env: {{ salt['defaults.get']('ntp:servers') }}
            - cwd: {{ salt['defaults.get']('motd:text') }}
            - shell: {{ salt['defaults.get']('nothing:here', 'fallback') }}
            - runas: {{ salt['defaults.get']('ntp:opts:x') }}
        """, catalog=UNTYPED)
    assert job[0]["args"] == {"env": ["a", "b"], "cwd": "hi", "shell": "fallback", "runas": 1}


# ---------------------------------------------------------------------------------------------
# What would run on the node: refused, with file:line and what to use instead

@pytest.mark.parametrize("call, instead", [
    ("salt['cmd.run']('hostname')", "a cmd.run state"),
    ("salt['mine.get']('*', 'network.ip_addrs')", "`nodes`"),
    ("salt['network.ip_addrs']()", "the grains `ipv4`"),
    ("salt['test.ping']()", "a state for what it does"),
])
def test_a_function_that_would_run_on_the_node_is_refused_at_its_line(tmp_path, call, instead):
    text = f"""
        a:
          cmd.run:
            - name: x
        b:
          cmd.run:
            - name: {{{{ {call} }}}}
        """
    message = refused(tmp_path, text)
    function = call.split("'")[1]
    assert message.startswith(f"s.sls:{line_of(text, 'salt[')}: salt[{function!r}] cannot be called here: it would "
                              "have to run on the node at render time")
    assert "renders state files on the master before anything is sent" in message
    assert f"instead, use {instead}" in message and "Traceback" not in message


def test_a_refused_call_in_map_jinja_names_map_jinja_and_its_line(tmp_path):
    write(tmp_path / "app/map.jinja", """
        {% set x = 1 %}
        {% set version = salt['cmd.run']('app --version') %}
        """)
    message = refused(tmp_path, "{% from 'app/map.jinja' import version with context %}\na:\n  cmd.run: [{name: x}]\n")
    assert message.startswith("app/map.jinja:2: salt['cmd.run'] cannot be called here")


def test_a_refused_call_in_a_templated_source_names_that_file(tmp_path):
    write(tmp_path / "files/motd.j2", "hello\n{{ salt['cmd.shell']('uptime') }}\n")
    message = refused(tmp_path, """
        /etc/motd:
          file.managed:
            - source: salt://files/motd.j2
            - template: jinja
        """)
    assert message.startswith("files/motd.j2:2: salt['cmd.shell'] cannot be called here")


def test_a_mistyped_function_gets_did_you_mean(tmp_path):
    assert "salt['pillar.gte'] is not a function pimaster has (did you mean 'pillar.get'?)" in \
        refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ salt['pillar.gte']('x') }}\n")
    assert "salt['pillar.gett'] is not a function pimaster has (did you mean 'pillar.get'?)" in \
        refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ salt.pillar.gett('x') }}\n")
    assert "salt['pillarget'] is not a function pimaster has (did you mean 'pillar.get'?)" in \
        refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ salt['pillarget']('x') }}\n")
    assert "Salt's functions are named module.function" in \
        refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ salt['nothing']('x') }}\n")
    # The dotted spelling is Salt's too.
    job = compile_text(tmp_path, "a:\n  cmd.run:\n    - name: {{ salt.pillar.get('x', 'dflt') }}\n")
    assert job[0]["name"] == "dflt"


# ---------------------------------------------------------------------------------------------
# Salt's tags

def test_do_break_and_continue(tmp_path):
    job = compile_text(tmp_path, """
        {% set names = [] %}
        {% for n in ['a', 'skip', 'b', 'stop', 'c'] %}
        {% if n == 'skip' %}{% continue %}{% endif %}
        {% if n == 'stop' %}{% break %}{% endif %}
        {% do names.append(n) %}
        {% endfor %}
        {% set settings = {'x': 1} %}
        {% do settings.update({'y': grains.host}) %}
        run:
          cmd.run:
            - name: {{ names | join(',') }}
            - env: {{ settings }}
        """, catalog=UNTYPED)
    assert job[0]["name"] == "a,b" and job[0]["args"]["env"] == {"x": 1, "y": "node01"}


def test_import_yaml_json_and_text_read_inside_the_tree_as_import_does(tmp_path):
    write(tmp_path / "data/settings.yaml", "servers: [a, b]\nport: 123\nflag: 'true'\n")
    write(tmp_path / "data/settings.json", '{"servers": ["c"], "nested": {"k": [1, 2]}}')
    write(tmp_path / "data/banner.txt", "line one\nline two: with a colon\n")
    write(tmp_path / "data/host.yaml",
          "host: {{ grains.host }}\nhosts: {{ [grains.host] | json }}\nfqdn: '{{ grains.fqdn }}'\n")
    job = compile_text(tmp_path, """
        {% import_yaml "data/settings.yaml" as y %}
        {% import_json "data/settings.json" as j %}
        {% import_text "data/banner.txt" as t %}
        {% import_yaml "data/host.yaml" as h with context %}
        {% load_yaml as block %}
        a: {{ grains.host }}
        b: [1, {{ grains.num_cpus }}]
        {% endload %}
        {% load_json as jblock %}{"n": {{ grains.num_cpus }}, "s": "{{ grains.num_cpus }}"}{% endload %}
        {% load_text as tblock %}{{ grains.host }} text{% endload %}
        run:
          cmd.run:
            - name: x
            - env: {{ [y, j, h, block, jblock] }}
            - cwd: {{ t }}
            - shell: {{ tblock }}
        """, catalog=UNTYPED)
    args = job[0]["args"]
    assert args["env"] == [{"servers": ["a", "b"], "port": 123, "flag": "true"},
                           {"servers": ["c"], "nested": {"k": [1, 2]}},
                           {"host": "node01", "hosts": ["node01"], "fqdn": "node01.cluster.lan"},
                           {"a": "node01", "b": [1, 4]}, {"n": 4, "s": "4"}]
    assert args["cwd"] == "line one\nline two: with a colon\n"  # one string value, not YAML
    assert args["shell"] == "node01 text"


def test_import_yaml_outside_the_tree_or_missing_is_an_error_at_its_line(tmp_path):
    root = tmp_path / "tree"
    write(tmp_path / "outside.yaml", "secret: 1\n")
    text = "{% import_yaml '../outside.yaml' as x %}\na:\n  cmd.run: [{name: x}]\n"
    message = refused(root, text)
    assert message.startswith("s.sls:1:") and "outside the state tree" in message
    message = refused(root, "a: {}\n{% import_yaml 'nope.yaml' as x %}\n")
    assert message.startswith("s.sls:2: template not found: nope.yaml")
    write(root / "bad.yaml", "a: [1,\n")
    message = refused(root, "a: {}\nb: {}\n{% import_yaml 'bad.yaml' as x %}\n")
    assert message.startswith("s.sls:3: load_yaml: bad.yaml: not YAML:")


def test_load_yaml_and_load_json_on_strings(tmp_path):
    job = compile_text(tmp_path, """
        {% set a = "{x: [1, 2]}" | load_yaml %}
        {% set b = load_json('{"y": true}') %}
        {% set c = salt['pillar.get']('text') | load_yaml %}
        run:
          cmd.run:
            - name: x
            - env: {{ [a, b, c] }}
        """, context_for(facts(), pillar={"text": "k: v\nl: [1]"}), catalog=UNTYPED)
    assert job[0]["args"]["env"] == [{"x": [1, 2]}, {"y": True}, {"k": "v", "l": [1]}]
    message = refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ '{\"x\": ' | load_json }}\n")
    assert message.startswith("s.sls:3: load_json: not JSON:")


# ---------------------------------------------------------------------------------------------
# Salt's filters

def test_salt_filters_give_salts_results_as_values(tmp_path):
    ctx = context_for(facts(), pillar={"d": {"users": [{"pi": {"uid": 1000}}], "list": ["b", "a", "b", "A"]}})
    job = compile_text(tmp_path, """
        run:
          cmd.run:
            - name: x
            - env:
                traverse: {{ pillar | traverse('d:users:pi:uid') }}
                traverse_index: {{ pillar | traverse('d:list:1') }}
                traverse_default: {{ pillar | traverse('d:nope', 'dflt') }}
                search: {{ 'abcd' | regex_search('^(.*)BC(.*)$', ignorecase=True) }}
                search_none: {{ 'abcd' | regex_search('x(y)') }}
                match: {{ grains.fqdn | regex_match('([a-z]+)([0-9]+)[.]') }}
                replace: {{ 'lets replace spaces' | regex_replace('[ ]+', '__') }}
                unique: {{ pillar.d.list | unique }}
                sequence_one: {{ 'foo' | sequence }}
                sequence_list: {{ ['bar'] | sequence }}
                bools: {{ ['yes', 'True', 1, 0, 'no', none, [], [1]] | map('to_bool') | list }}
                json: {{ {'b': 1, 'a': '<&>'} | json }}
                json_text: "{{ {'b': 1, 'a': '<&>'} | json }}"
                yaml: {{ {'k': [1, 2]} | yaml }}
                yaml_text: "{{ {'k': [1, 2]} | yaml }} {{ 'a' | yaml }}"
                yaml_block: "{{ {'k': [1, 2]} | yaml(False) }}"
        """, ctx, UNTYPED)
    assert job[0]["args"]["env"] == {
        "traverse": 1000, "traverse_index": "a", "traverse_default": "dflt",
        "search": ["a", "d"], "search_none": None, "match": ["node", "01"], "replace": "lets__replace__spaces",
        "unique": ["b", "a", "A"], "sequence_one": ["foo"], "sequence_list": ["bar"],
        "bools": [True, True, True, False, False, False, False, True],
        "json": {"a": "<&>", "b": 1}, "json_text": '{"a": "<&>", "b": 1}',
        "yaml": {"k": [1, 2]}, "yaml_text": "{k: [1, 2]} a", "yaml_block": "k:\n- 1\n- 2"}


def test_salt_filters_and_functions_in_a_templated_file(tmp_path):
    write(tmp_path / "conf.j2", """
        {{ {'b': 1, 'a': '<x>'} | json }}
        {{ {'k': 'v'} | yaml }} {{ 'plain' | yaml }}
        {{ salt['pillar.get']('servers') | join(' ') }} {{ grains.osfinger }} {{ tpldir }}
        {{ 'a-b' | regex_replace('-', '_') }} {{ 'abcd' | regex_search('(b)(c)') }} {{ [1, 1, 2] | unique }}
        {%- import_yaml "data.yaml" as d %} {{ d.k }}
        """)
    write(tmp_path / "data.yaml", "k: from yaml\n")
    ctx = dict(context_for(facts(), pillar={"servers": ["a", "b"]}),
               **file_context(str(tmp_path / "conf.j2"), str(tmp_path)))
    # As compile_for_node converts a context:
    ctx = {k: v if callable(v) or isinstance(v, Pending) else to_attrdict(v) for k, v in ctx.items()}
    assert isinstance(ctx["salt"], SaltFunctions)  # passed through as it is
    text = render_template(str(tmp_path / "conf.j2"), ctx, "conf.j2", state_tree(str(tmp_path)))
    assert text == ('{"a": "<x>", "b": 1}\n{k: v} plain\na b Debian-12 .\n'
                    "a_b ('b', 'c') [1, 2] from yaml\n")


def test_a_bad_regular_expression_is_an_error_at_its_line(tmp_path):
    text = "a:\n  cmd.run:\n    - name: x\n    - cwd: {{ 'x' | regex_replace('(', '') }}\n"
    message = refused(tmp_path, text)
    assert message.startswith("s.sls:4: regex_replace: '(' is not a regular expression:")


def test_more_salt_filters_give_salts_results_as_values(tmp_path):
    ctx = context_for(facts(), pillar={"a": [1, 2, 3], "b": [2, 3, 4], "n": [1, [2, [3, None]], "null"]})
    job = compile_text(tmp_path, """
        run:
          cmd.run:
            - name: x
            - env:
                encode_text: {{ 'a: "b"' | yaml_encode }}
                traverse_default: {{ pillar | traverse('nope', 'k: v') }}
                to_num_text: {{ 'k: v' | to_num }}
                encode_num: {{ 5 | yaml_encode }}
                encode_none: {{ none | yaml_encode }}
                dquote: {{ 'a: b' | yaml_dquote }}
                dquote_num: {{ 5 | yaml_dquote }}
                squote: {{ "it's" | yaml_squote }}
                in_text: "x {{ 'y' | yaml_dquote }}"
                to_num: {{ ['12', '1.5', 'x', 3] | map('to_num') | list }}
                is_list: {{ [[1], 'a', {}] | map('is_list') | list }}
                md5: {{ 'abc' | md5 }}
                sha256: {{ 'abc' | sha256 }}
                sha512: {{ ('x ' ~ grains.host) | sha512 }}
                b64: {{ 'héllo' | base64_encode }}
                b64back: {{ 'aMOpbGxv' | base64_decode }}
                escape: {{ 'a.b*c' | regex_escape }}
                union: {{ pillar.a | union(pillar.b) }}
                intersect: {{ pillar.a | intersect(pillar.b) }}
                difference: {{ pillar.a | difference(pillar.b) }}
                symmetric: {{ pillar.a | symmetric_difference(pillar.b) }}
                flatten: {{ pillar.n | flatten }}
                flatten_one: {{ pillar.n | flatten(levels=1) }}
                flatten_nulls: {{ pillar.n | flatten(preserve_nulls=True) }}
                path: {{ '/etc' | path_join('/ssh', 'sshd_config') }}
                path_dots: {{ 'a/./b/' | path_join('../c') }}
                match: {{ grains.host is match('node[0-9]+') }}
                match_built: {{ grains.fqdn is match('^' ~ grains.host ~ '[.]') }}
                match_case: {{ 'ABC' is match('abc', ignorecase=True) }}
                no_match: {{ grains.host is match('[0-9]') }}
        """, ctx, UNTYPED)
    assert job[0]["args"]["env"] == {
        "encode_text": 'a: "b"', "traverse_default": "k: v", "to_num_text": "k: v", "encode_num": 5,
        "encode_none": None,
        "dquote": "a: b", "dquote_num": "5", "squote": "it's", "in_text": "x y",
        "to_num": [12, 1.5, "x", 3], "is_list": [True, False, False],
        "md5": hashlib.md5(b"abc").hexdigest(), "sha256": hashlib.sha256(b"abc").hexdigest(),
        "sha512": hashlib.sha512(b"x node01").hexdigest(),
        "b64": "aMOpbGxv", "b64back": "héllo", "escape": "a\\.b\\*c",
        "union": [1, 2, 3, 4], "intersect": [2, 3], "difference": [1], "symmetric": [1, 4],
        "flatten": [1, 2, 3], "flatten_one": [1, 2, [3, None]], "flatten_nulls": [1, 2, 3, None, "null"],
        "path": "/etc/ssh/sshd_config", "path_dots": "a/c",
        "match": True, "match_built": True, "match_case": True, "no_match": False}


def test_yaml_quoting_filters_give_yaml_scalars_in_a_templated_file(tmp_path):
    write(tmp_path / "conf.j2", """
        a: {{ 'x: "y"' | yaml_encode }}
        b: {{ 12 | yaml_encode }} {{ true | yaml_encode }} {{ none | yaml_encode }}
        c: {{ "it's" | yaml_squote }}
        d: {{ grains.host | yaml_dquote }}
        e: {{ 'ab' | md5 }} {{ '/a' | path_join('b') }} {{ [1, [2]] | flatten }} {{ 'x1' is match('x') }}
        """)
    ctx = dict(context_for(facts()), **file_context(str(tmp_path / "conf.j2"), str(tmp_path)))
    text = render_template(str(tmp_path / "conf.j2"), ctx, "conf.j2", state_tree(str(tmp_path)))
    assert text == ("a: \"x: \\\"y\\\"\"\nb: 12 true null\nc: 'it''s'\nd: \"node01\"\n"
                    f"e: {hashlib.md5(b'ab').hexdigest()} /a/b [1, 2] True\n")
    assert yaml.safe_load(text.split("\ne:")[0]) == {"a": 'x: "y"', "b": "12 true null", "c": "it's", "d": "node01"}
    message = refused(tmp_path, "a:\n  cmd.run:\n    - name: x\n    - env: {{ [1] | yaml_encode }}\n")
    assert message.startswith("s.sls:4: yaml_encode: only text, numbers")
    message = refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ 'YQ' | base64_decode }}\n")
    assert message.startswith("s.sls:3: base64_decode:")


def test_slsutil_merge_merge_all_and_update_as_salt_has_them():
    s = salt()
    a = {"x": {"k": 1, "l": [1]}, "only_a": 1}
    b = {"x": {"j": 2, "l": [2]}, "only_b": 2}
    assert s["slsutil.merge"](a, b) == {"x": {"k": 1, "j": 2, "l": [2]}, "only_a": 1, "only_b": 2}
    assert s["slsutil.merge"](a, b, merge_lists=True)["x"]["l"] == [1, 2]
    assert s["slsutil.merge"](a, b, strategy="overwrite") == {"x": {"j": 2, "l": [2]}, "only_a": 1, "only_b": 2}
    assert s["slsutil.merge"](a, b, renderer="jinja|yamlex") == {"x": {"j": 2, "l": [2]}, "only_a": 1, "only_b": 2}
    assert s["slsutil.merge"](a, b, strategy="list") == {"x": [{"k": 1, "l": [1]}, {"j": 2, "l": [2]}], "only_a": 1}
    assert a == {"x": {"k": 1, "l": [1]}, "only_a": 1}  # merge leaves its arguments as they were
    assert s["slsutil.merge_all"]([{"a": {"x": 1}}, {"a": {"y": 2}}, {"b": 3}]) == {"a": {"x": 1, "y": 2}, "b": 3}
    assert s["slsutil.merge_all"]([{"l": [1]}, {"l": [2]}], merge_lists=True) == {"l": [1, 2]}
    dest = {"x": {"k": 1}, "l": [1]}
    assert s["slsutil.update"](dest, {"x": {"j": 2}, "l": [2]}, merge_lists=True) is dest
    assert dest == {"x": {"k": 1, "j": 2}, "l": [1, 2]}
    assert s["slsutil.update"](dest, {"x": {"z": 0}}, recursive_update=False) == {"x": {"z": 0}, "l": [1, 2]}
    with pytest.raises(TemplateRefusal, match="mappings"):
        s["slsutil.merge"]([1], {"a": 1})


def test_log_functions_log_at_debug_and_raise_fails_the_rendering_at_its_line(tmp_path, caplog):
    caplog.set_level("DEBUG", logger="pimaster")
    job = compile_text(tmp_path, """
        {%- do salt['log.debug']('seen ' ~ grains.host) %}
        {%- do salt.log.error('error text') %}
        a:
          cmd.run:
            - name: x{{ salt['log.warning']('w') }}{{ salt.log.info('i') }}{{ salt.log.critical('c') }}
        """)
    assert job[0]["name"] == "x"
    logged = [r.getMessage() for r in caplog.records if r.name == "pimaster"]
    assert "template log.debug: 'seen node01'" in logged and "template log.error: 'error text'" in logged
    assert {r.levelname for r in caplog.records if r.name == "pimaster"} == {"DEBUG"}
    text = """
        a:
          cmd.run:
            - name: x
        {% if grains.os != 'Fedora' %}
        {{ raise('this formula wants Fedora, not ' ~ grains.os) }}
        {% endif %}
        """
    assert refused(tmp_path, text) == f"s.sls:{line_of(text, 'raise(')}: this formula wants Fedora, not Debian"
    write(tmp_path / "m/map.jinja", "{% set x = 1 %}\n{% do raise('map says no') %}\n")
    assert refused(tmp_path, "{% from 'm/map.jinja' import x %}\na: {}\n") == "m/map.jinja:2: map says no"


def test_errors_name_what_the_template_wrote_not_internal_classes(tmp_path):
    text = "a:\n  cmd.run:\n    - name: {{ pillar['nope'] }}\n"
    assert "s.sls:3: undefined in template: pillar has no key 'nope'" in refused(tmp_path, text)
    assert "pillar has no key 'ntpp' (did you mean 'ntp'?)" in refused(
        tmp_path, "a:\n  cmd.run:\n    - name: {{ pillar.ntpp }}\n", context_for(facts(), pillar={"ntp": 1}))
    assert "grains has no key 'nope'" in refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ grains['nope'] }}\n")
    message = refused(tmp_path, "a:\n  cmd.run:\n    - name: {{ grains.num_cpus + 'a' }}\n")
    assert "'int' and 'str'" in message and "_Text" not in message
    for expression, expected in [
        ("salt.nope", "salt.nope is a module, not a value: call one of its functions, e.g. salt.nope.get(...)"),
        ("salt.pillar", "salt.pillar is a module, not a value: call one of its functions, e.g. salt.pillar.get(...)"),
        ("salt", "salt is Salt's functions, not a value: call one"),
        ("salt['pillar.get']", "salt['pillar.get'] is a function, not a value: call it"),
        ("'at ' ~ salt.nope", "salt.nope is a module, not a value"),
    ]:
        text = f"a:\n  cmd.run:\n    - name: x\n    - cwd: {{{{ {expression} }}}}\n"
        message = refused(tmp_path, text)
        assert message.startswith(f"s.sls:4: {expected}"), message
        assert "object at 0x" not in message
    write(tmp_path / "motd.j2", "hello\n{{ salt.pillar }}\n")
    message = refused(tmp_path, "/etc/motd:\n  file.managed:\n    - source: salt://motd.j2\n    - template: jinja\n")
    assert message.startswith("motd.j2:2: salt.pillar is a module, not a value")


def test_a_file_imported_without_context_sees_salts_names_for_the_node_rendered(tmp_path):
    """Salt 3006 puts the context into the environment's globals: the template-formula's
    map.jinja and libmapstack are imported without context. One tree (one environment, its
    compiled templates kept) renders two nodes one after the other: each sees its own."""
    write(tmp_path / "tf/libmapstack.jinja", """
        {%- macro mapstack() -%}
        {{ {'id': grains.id, 'cfg': salt['config.get']('id'), 'p': pillar.p, 'pg': salt.pillar.get('p'),
            'opts': opts.id, 'env': saltenv, 'tpldir': tpldir} | json }}
        {%- endmacro %}
        """)
    write(tmp_path / "tf/map.jinja", """
        {%- set tplroot = tpldir.split('/')[0] %}
        {%- from tplroot ~ "/libmapstack.jinja" import mapstack %}
        {%- set mapdata = mapstack() | load_json %}
        {%- set id_now = grains.id %}
        """)
    write(tmp_path / "tf/conf.j2", '{% from "tf/map.jinja" import id_now %}{{ id_now }} {{ grains.id }}\n')
    write(tmp_path / "tf/init.sls", """
        {% from "tf/map.jinja" import mapdata with context %}
        {% from "tf/map.jinja" import id_now %}
        a:
          cmd.run:
            - name: {{ id_now }}
            - env: {{ mapdata }}
        /etc/conf:
          file.managed:
            - source: salt://tf/conf.j2
            - template: jinja
        """)
    tree = state_tree(str(tmp_path))
    path = tmp_path / "tf/init.sls"
    for node in ("n1", "n2", "n1"):
        ctx = dict(context_for(facts(), {"id": node, "hostname": node}, pillar={"p": f"pillar of {node}"}),
                   **file_context(str(path), str(tmp_path)))
        job = by_id(compile_for_node(str(path), ctx, UNTYPED, tree=tree))
        assert job["a"]["name"] == node
        assert job["a"]["args"]["env"] == {"id": node, "cfg": node, "p": f"pillar of {node}",
                                           "pg": f"pillar of {node}", "opts": node, "env": "base", "tpldir": "tf"}
        assert job["/etc/conf"]["args"]["contents"] == f"{node} {node}\n"
    assert len(tree.envs) == 2 and all("grains" not in env.globals for env in tree.envs.values())


# ---------------------------------------------------------------------------------------------
# Facts are hostile: through every Salt name and filter, a fact stays one value

def _yaml(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return text[:-4] if text.endswith("\n...") else text


# Each expression, what it gives standing alone (the value), and printed into longer text.
SAME, LISTED = (lambda e: e, str), (lambda e: [e], lambda e: str([e]))
HEX = lambda e: hashlib.md5(e.encode()).hexdigest()  # noqa: E731
EXPRESSIONS = [
    ("grains.kernelrelease", *SAME), ("grains['osarch']", *SAME), ("salt['grains.get']('cpuarch')", *SAME),
    ("salt['config.get']('kernelrelease')", *SAME), ("salt['pillar.get']('copied')", *SAME), ("pillar.copied", *SAME),
    ("salt['grains.filter_by']({'*': grains.kernelrelease}, grain='kernelrelease')", *SAME),
    ("salt['defaults.merge']({}, {'h': grains.kernelrelease}).h", *SAME),
    ("grains.kernelrelease | json", lambda e: e, json.dumps), ("grains.kernelrelease | yaml", lambda e: e, _yaml),
    ("grains | traverse('kernelrelease')", *SAME), ("grains.kernelrelease | regex_replace('^', '')", *SAME),
    ("(grains.kernelrelease | regex_search('(?s)(.*)'))[0]", *SAME),
    ("(grains.kernelrelease | regex_match('(?s)(.*)'))[0]", *SAME),
    ("grains.kernelrelease | load_text", *SAME), ("({'h': grains.kernelrelease} | json | load_json).h", *SAME),
    ("[grains.kernelrelease, grains.kernelrelease] | unique", *LISTED), ("grains.kernelrelease | sequence", *LISTED),
    ("[grains.kernelrelease] | yaml | load_yaml", *LISTED),
    ("grains.kernelrelease | yaml_encode", *SAME), ("grains.kernelrelease | yaml_dquote", *SAME),
    ("grains.kernelrelease | yaml_squote", *SAME), ("grains.kernelrelease | to_num", *SAME),
    ("grains.kernelrelease | base64_encode | base64_decode", *SAME), ("grains.kernelrelease | path_join", *SAME),
    ("grains.kernelrelease | md5", HEX, HEX),
    ("grains.kernelrelease if grains.kernelrelease is match('^' ~ (grains.kernelrelease | regex_escape) ~ '$') "
     "else 'no'", *SAME),
    ("[grains.kernelrelease] | union([grains.kernelrelease])", *LISTED),
    ("[grains.kernelrelease, 'x'] | intersect([grains.kernelrelease])", *LISTED),
    ("[grains.kernelrelease, 'x'] | difference(['x'])", *LISTED),
    ("[grains.kernelrelease] | symmetric_difference([])", *LISTED), ("[[grains.kernelrelease]] | flatten", *LISTED),
]


@pytest.mark.parametrize("evil", HOSTILE)
@pytest.mark.parametrize("expression, alone, printed", EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS])
def test_a_hostile_fact_stays_one_value_through_every_salt_name_and_filter(tmp_path, evil, expression, alone, printed):
    # Grains take the inventory's hostname: a node's own word reaches them as its kernel and architectures.
    node_facts = facts(hostname=evil, fqdn=evil, kernel=evil, arch=evil, machine=evil)
    ctx = context_for(node_facts, pillar={"copied": evil})
    text = f"""
        {{{{ {expression} }}}}:
          cmd.run:
            - name: {{{{ {expression} }}}}
            - env: {{{{ {expression} }}}}
            - cwd: at {{{{ {expression} }}}} end
        after:
          cmd.run:
            - name: "{{{{ {expression} }}}}"
        """
    job = compile_text(tmp_path, text, ctx, UNTYPED)
    assert [(s["id"], s["fun"]) for s in job] == [(printed(evil), "cmd.run"), ("after", "cmd.run")]
    first, after = job
    assert first["args"] == {"env": alone(evil), "cwd": f"at {printed(evil)} end"}
    assert first["name"] == printed(evil) or first["name"] == alone(evil)
    assert after["name"] == printed(evil) and after["args"] == {}
    assert "49" not in json.dumps(job)  # "{{ 7*7 }}" in a fact is never Jinja


def test_to_bool_of_a_hostile_fact_is_a_bool_and_load_yaml_of_one_is_one_value(tmp_path):
    ctx = context_for(facts(pi_model="evil: true\nmore:\n  cmd.run: [{name: touch /tmp/pwned}]"))
    job = compile_text(tmp_path, """
        a:
          cmd.run:
            - name: x
            - env: {{ node.pi_model | load_yaml }}
            - cwd: {{ node.pi_model | to_bool }}
        """, ctx, UNTYPED)
    assert [s["id"] for s in job] == ["a"]  # what the text holds is data in one argument, never states
    assert job[0]["args"] == {"env": {"evil": True, "more": {"cmd.run": [{"name": "touch /tmp/pwned"}]}},
                              "cwd": False}


def test_a_fact_in_a_loaded_yaml_block_stays_that_value(tmp_path):
    ctx = context_for(facts(kernel="x\nevil: true", arch="y\n- z"))
    job = compile_text(tmp_path, """
        {% load_yaml as data %}
        host: {{ grains.kernelrelease }}
        list: [{{ grains.osarch }}, {{ grains.kernelrelease }}]
        text: "{{ grains.kernelrelease }}"
        joined: {{ grains.kernelrelease }}/{{ grains.osarch }}
        {{ grains.kernelrelease }}: key
        {% endload %}
        a:
          cmd.run:
            - name: x
            - env: {{ data }}
        """, ctx, UNTYPED)
    assert job[0]["args"]["env"] == {"host": "x\nevil: true", "list": ["y\n- z", "x\nevil: true"],
                                     "text": "x\nevil: true", "joined": "x\nevil: true/y\n- z",
                                     "x\nevil: true": "key"}


def test_text_that_cannot_be_loaded_is_an_error_not_a_traceback(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    for text in (f"{{{{ '{deep}' | load_yaml }}}}", f"{{{{ '{deep}' | load_json }}}}",
                 "{{ '!!python/object/apply:os.system [echo]' | load_yaml }}"):
        message = refused(tmp_path, f"a:\n  cmd.run:\n    - name: {text}\n")
        assert message.startswith("s.sls:3: load_") and "Traceback" not in message
