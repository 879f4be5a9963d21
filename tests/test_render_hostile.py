"""State files against hostile data: what a root-compromised Pi reports (facts, results) is data in
every node's job, never YAML structure, and rendering reads nothing outside the state tree.

Real rendering throughout (master/render.py's compile_for_node, the agent's own catalogue); the
contexts are built the way master/jobs.py's Plan builds them: a node's facts with its inventory
entry on top, every node the same way in `nodes`, the inventory's `cluster`.
"""

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from piagent.states import catalog
from pimaster import render, statetree, template
from pimaster.render import Pending, StateFileErrors, compile_for_node

STATES = Path(__file__).resolve().parents[1] / "states"
CATALOG = catalog()
# The same without argument types: for the tests that use cmd.run's arguments to carry values of
# every type. What a value becomes is rendering's business, tested here; whether a state function
# takes it is validation's (tests/test_broken_state_files.py).
UNTYPED = {fun: {k: v for k, v in spec.items() if k != "types"} for fun, spec in CATALOG.items()}
EVIL = "x\nevil:\n  cmd.run:\n    - name: touch /tmp/pwned"
SECRET = "MASTER-PRIVATE-KEY-MATERIAL"


def facts(i: int, **extra) -> dict:
    ip = f"10.77.0.{10 + i}"
    base = {"hostname": f"node0{i}", "machine_id": f"{i:032x}", "pi_model": "Raspberry Pi 4 Model B Rev 1.4",
            "interfaces": [{"name": "eth0", "mac": f"dc:a6:32:00:00:0{i}", "addresses": [f"{ip}/24"]}],
            "macs": [f"dc:a6:32:00:00:0{i}"], "ips": [ip], "cpu_count": 4, "memory_mb": 3794,
            "os": {"ID": "debian", "VERSION_CODENAME": "bookworm"}, "arch": "arm64", "machine": "aarch64",
            "boot_dir": "/boot/firmware", "systemd": True, "virtualization": "none", "agent_version": "0.1.0"}
    base.update(extra)
    return base


ROLES = {1: ["master", "controller", "nfs-server", "time-server", "control-plane"],
         2: ["compute", "worker"], 3: ["compute", "worker"], 4: ["compute", "worker"]}


def contexts(all_facts: dict[str, dict], cluster: dict | None, entries: dict[str, dict] | None = None,
             results=None) -> dict[str, dict]:
    """node id -> the context Plan.render gives compile_for_node."""
    if entries is None:  # no inventory: a node is what it says it is
        entries = {n: {"id": n, "hostname": f.get("hostname", n), "roles": [], "ip": f["ips"][0]}
                   for n, f in all_facts.items()}
    node = {n: dict(all_facts[n], **entries[n], facts=all_facts[n]) for n in all_facts}
    everyone = [node[n] for n in sorted(node)]
    return {n: {"node": node[n], "nodes": everyone, "cluster": cluster or {},
                "results": Pending() if results is None else render.to_attrdict(results),
                "secret": lambda name, length=64: "5ec2e7" * 4} for n in node}


def lab_entries() -> dict[str, dict]:
    return {f"node0{i}": {"id": f"node0{i}", "hostname": f"node0{i}", "ip": f"10.77.0.{10 + i}", "roles": ROLES[i]}
            for i in range(1, 5)}


def shipped_cluster() -> dict:
    return yaml.safe_load((STATES / "cluster.yaml").read_text())["cluster"]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def compile_text(tree: Path, text: str, context: dict | None = None, catalog: dict = CATALOG, **kwargs) -> list[dict]:
    return compile_for_node(str(write(tree / "s.yaml", text)), context or {}, catalog, str(tree), **kwargs)


def refused(tree: Path, text: str, context: dict | None = None, **kwargs) -> str:
    with pytest.raises(StateFileErrors) as caught:
        compile_text(tree, text, context, **kwargs)
    return str(caught.value)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(textwrap.dedent(text).splitlines(), 1) if needle in line)


def by_id(job: list[dict]) -> dict[str, dict]:
    return {s["id"]: s for s in job}


# ---------------------------------------------------------------------------------------------
# Values are data


def test_a_hostname_fact_holding_yaml_is_one_string_and_adds_no_state(tmp_path):
    all_facts = {"node01": facts(1), "node02": facts(2, hostname=EVIL)}
    ctx = contexts(all_facts, None)
    text = """
        hostname:
          host.hostname:
            - name: {{ node.hostname }}
        {% for n in nodes %}
        hosts-{{ n.hostname }}:
          host.present:
            - name: {{ n.hostname }}
            - ip: {{ n.ip }}
        {% endfor %}
        """
    for node_id in ("node01", "node02"):
        job = compile_text(tmp_path, text, ctx[node_id])
        assert [s["id"] for s in job] == ["hostname", "hosts-node01", f"hosts-{EVIL}"]
        assert all(s["fun"] in ("host.hostname", "host.present") for s in job)
        assert not any("pwned" in s["name"] and s["fun"] == "cmd.run" for s in job)
        assert by_id(job)[f"hosts-{EVIL}"]["name"] == EVIL
        assert by_id(job)[f"hosts-{EVIL}"]["args"] == {"ip": "10.77.0.12"}
    assert by_id(compile_text(tmp_path, text, ctx["node02"]))["hostname"]["name"] == EVIL


def test_the_shipped_network_yaml_with_hostile_interface_and_address_facts(tmp_path):
    site = tmp_path / "site"
    shutil.copytree(STATES, site)
    secret = write(tmp_path / "master.key", SECRET)
    hostile_iface = f"eth0\n/etc/x:\n  file.managed:\n    - source: {secret}\n    - name: /etc/x\n"
    hostile_ip = f"10.77.0.99\nevil:\n  file.managed:\n    - name: /etc/x\n    - source: {secret}"
    all_facts = {f"node0{i}": facts(i) for i in range(1, 5)}
    benign = {n: compile_for_node(str(site / "network.yaml"), c, CATALOG, str(site))
              for n, c in contexts(all_facts, shipped_cluster(), lab_entries()).items()}

    all_facts["node02"]["interfaces"] = [{"name": hostile_iface, "mac": "dc:a6:32:00:00:02",
                                         "addresses": ["10.77.0.12/24"]}]
    all_facts["node01"]["ips"] = [hostile_ip]  # the master's node: the "move it by hand" message
    for node_id, context in contexts(all_facts, shipped_cluster(), lab_entries()).items():
        job = compile_for_node(str(site / "network.yaml"), context, CATALOG, str(site))
        assert [s["id"] for s in job] == [s["id"] for s in benign[node_id]]
        assert SECRET not in json.dumps(job)
        assert not any(s["fun"] == "file.managed" for s in job)
        if node_id == "node02":
            assert by_id(job)["address"]["fun"] == "network.static"
            assert by_id(job)["address"]["name"] == hostile_iface
            assert by_id(job)["address"]["args"]["address"] == "10.77.0.12/24"
        elif node_id == "node01":  # it says it lost its address: the refusal to move it, naming what it said
            assert by_id(job)["address"]["fun"] == "cmd.run"
            assert f"move it from {hostile_ip} to 10.77.0.11 by hand" in by_id(job)["address"]["name"]
        else:
            assert job == benign[node_id]


def test_tojson_gives_one_structured_value_and_strings_in_it_stay_data(tmp_path):
    dns = ["1.1.1.1"]
    env = {"A": "b\nc: d", "B": "- x", "C": "{{ not jinja }}", "D": "true"}
    job = compile_text(tmp_path, """
        address:
          network.static:
            - name: eth0
            - address: 10.0.0.2/24
            - dns: {{ dns | list | tojson }}
        run:
          cmd.run:
            - name: echo '{{ env | tojson }}'
            - env: {{ env | tojson }}
            - success_retcodes: {{ [0, 2] | yaml }}
        """, {"dns": dns, "env": env})
    assert by_id(job)["address"]["args"]["dns"] == ["1.1.1.1"]
    assert by_id(job)["run"]["args"]["env"] == env
    assert by_id(job)["run"]["args"]["success_retcodes"] == [0, 2]
    assert json.loads(by_id(job)["run"]["name"][len("echo '"):-1]) == env  # the JSON text, as before
    assert [s["id"] for s in job] == ["address", "run"]


@pytest.mark.parametrize("value, expected", [
    (60, 60), ("60", "60"), ("true", "true"), (True, True), (None, None), (1.5, 1.5),
    ([1, "a"], [1, "a"]), ({"k": (1, 2)}, {"k": [1, 2]}), ("0644", "0644"), ("  padded ", "  padded "),
])
def test_a_value_alone_keeps_its_own_type(tmp_path, value, expected):
    job = compile_text(tmp_path, """
        a:
          cmd.run:
            - name: x
            - env: {{ v }}
        """, {"v": value}, UNTYPED)
    assert job[0]["args"]["env"] == expected
    assert type(job[0]["args"]["env"]) is type(expected)


def test_string_literals_the_file_writes_are_template_text_as_in_salt(tmp_path):
    job = compile_text(tmp_path, """
        a:
          cmd.run:
            - name: {{ 'echo' }}
            - env: {{ "60" }}
            - cwd: {{ 'true' }}
            - success_retcodes: [{% for x in servers %}{{ x }}{{ ', ' if not loop.last }}{% endfor %}]
            - creates: [{{ servers | join(', ') }}]
        """, {"servers": ["1.1.1.1", "8.8.8.8\nevil: x"]}, UNTYPED)
    args = job[0]["args"]
    assert job[0]["name"] == "echo" and args["env"] == 60 and args["cwd"] is True
    # The separators are the file's; each item stays one value, whatever it holds.
    assert args["success_retcodes"] == args["creates"] == ["1.1.1.1", "8.8.8.8\nevil: x"]


def test_a_value_in_text_is_printed_into_one_string(tmp_path):
    job = compile_text(tmp_path, """
        {{ 5 }}:
          cmd.run:
            - name: "{{ x }}"
            - cwd: {{ a }}/{{ b }}
            - env: '{{ flag }}'
            - runas: |
                {{ a }} {{ evil }}
            - shell: {{ a }} # {{ evil }}
            - creates: x{{ none }}
        """, {"x": 5, "a": 1, "b": 2, "flag": True, "evil": EVIL}, UNTYPED)
    assert [s["id"] for s in job] == ["5"]
    assert job[0]["name"] == "5"
    assert job[0]["args"] == {"cwd": "1/2", "env": "True", "runas": f"1 {EVIL}\n", "shell": 1, "creates": "xNone"}


def test_mode_digits_and_pending_results_behave_as_before(tmp_path):
    job = compile_text(tmp_path, """
        /x:
          file.managed:
            - contents: "{{ results.node01['make'].changes.stdout | trim }}"
            - mode: {{ m }}
        /y:
          file.managed:
            - contents: {{ results.node01.x }}
            - mode: 0644
        /z:
          file.managed:
            - contents: a{{ results.node01.x }}b
            - mode: {{ n }}
        """, {"m": "0644", "n": 644, "results": Pending()})
    assert [(s["args"]["contents"], s["args"]["mode"]) for s in job] == [("", "0644"), ("", "0644"), ("ab", "644")]


def test_text_the_template_writes_stays_yaml_and_values_in_it_stay_values(tmp_path):
    write(tmp_path / "fragment.yaml", """
        from-include:
          cmd.run:
            - name: {{ evil }}
        """)
    job = compile_text(tmp_path, """
        {% macro state(id, cmd) %}
        {{ id }}:
          cmd.run:
            - name: {{ cmd }}
        {% endmacro %}
        {% macro wrap() %}{{ caller() }}{% endmacro %}
        {{ state('from-macro', evil) }}
        {% call wrap() %}
        from-caller:
          cmd.run:
            - name: {{ evil }}
        {% endcall %}
        {% set block %}
        from-set-block:
          cmd.run:
            - name: {{ evil }}
        {% endset %}
        {{ block }}
        {% include 'fragment.yaml' %}
        {% macro word(w) %}{{ w }}-w{% endmacro %}
        joined:
          cmd.run:
            - name: {{ word('a') ~ evil }}
            - cwd: {{ [word('a'), evil] | join(', ') }}
            - env: {{ '%s|%s' | format(word('a'), evil) }}
            - runas: {{ word('a') | replace('-w', evil) }}
            - shell: {{ evil | e }}
            - creates: {{ word(evil) }}
        """, {"evil": EVIL}, UNTYPED)
    assert [s["id"] for s in job] == ["from-macro", "from-caller", "from-set-block", "from-include", "joined"]
    assert all(s["fun"] == "cmd.run" for s in job)
    assert [s["name"] for s in job[:4]] == [EVIL] * 4
    assert job[4]["name"] == "a-w" + EVIL
    assert job[4]["args"] == {"cwd": f"a-w, {EVIL}", "env": f"a-w|{EVIL}", "runas": "a" + EVIL, "shell": EVIL,
                              "creates": EVIL + "-w"}


def test_error_lines_are_the_template_lines_whatever_the_values_hold(tmp_path):
    text = """
        a:
          cmd.run:
            - name: {{ evil }}
            - cwd: "{{ evil }}"
            - runas: |
                {{ evil }}
        b:
          cmd.run:
            - nmae: x
        """
    message = refused(tmp_path, text, {"evil": EVIL * 3})
    assert message == f"s.yaml:{line_of(text, 'b:') + 1}: b: cmd.run has no argument 'nmae' (did you mean 'name'?)"


def test_a_module_imported_without_context_works_in_every_rendering(tmp_path):
    write(tmp_path / "m.jinja", "{% set text %}{{ 5 }}{% endset %}{% macro echo(x) %}{{ x }}{% endmacro %}")
    for host in ("node01", "node02", EVIL):  # one environment, its compiled templates kept
        job = compile_text(tmp_path, """
            {% import 'm.jinja' as m %}
            a:
              cmd.run:
                - name: {{ m.text }}
                - cwd: {{ m.echo(host) }}
            """, {"host": host})
        assert (job[0]["name"], job[0]["args"]) == ("5", {"cwd": host})


def test_a_filter_that_rewrites_values_in_template_text_is_an_error_at_its_line(tmp_path):
    text = """
        a:
          cmd.run:
            - name: {% filter upper %}echo {{ evil }}{% endfilter %}
        """
    message = refused(tmp_path, text, {"evil": EVIL})
    assert f"s.yaml:{line_of(text, 'filter upper')}: a filter rewrote text" in message
    assert "pwned" not in message


def test_quote_makes_a_value_one_shell_word(tmp_path):
    job = compile_text(tmp_path, """
        a:
          cmd.run:
            - name: ping -c1 {{ h | quote }}
        """, {"h": "x; touch /tmp/pwned"})
    assert job[0]["name"] == "ping -c1 'x; touch /tmp/pwned'"


def test_templated_file_contents_are_plain_text_not_escaped(tmp_path):
    write(tmp_path / "files" / "t.j2", "value={{ value }}\nlist={{ items | join(',') }}\n")
    job = compile_text(tmp_path, """
        /etc/x:
          file.managed:
            - source: files/t.j2
            - template: jinja
        """, {"value": "a\nb: <c> & 'd'", "items": ["1", "2"]})
    assert job[0]["args"]["contents"] == "value=a\nb: <c> & 'd'\nlist=1,2\n"


def test_an_undefined_value_is_still_an_error_at_its_line(tmp_path):
    text = """
        a:
          cmd.run:
            - name: echo {{ node.no_such_fact }}
        """
    assert f"s.yaml:{line_of(text, 'no_such_fact')}: undefined in template" in refused(tmp_path, text, {"node": {}})


# ---------------------------------------------------------------------------------------------
# Only the state tree is read


@pytest.fixture
def tree(tmp_path) -> Path:
    """tmp/a/site is the state tree; secrets sit next to it, one and two levels up."""
    site = tmp_path / "a" / "site"
    site.mkdir(parents=True)
    for path in (tmp_path / "x", tmp_path / "a" / "x"):
        path.write_text(f"{SECRET}\nevil:\n  cmd.run:\n    - name: touch /tmp/pwned\n")
    write(tmp_path / "a" / "other.yaml", "evil:\n  cmd.run:\n    - name: touch /tmp/pwned\n")
    (site / "link").symlink_to(tmp_path / "a" / "x")
    (site / "linkdir").symlink_to(tmp_path / "a")
    write(site / "files" / "ok.txt", "inside\n")
    return site


@pytest.mark.parametrize("source", [
    "{outside}/x", "/etc/passwd", "../x", "salt://../../x", "salt:///etc/passwd", "link", "linkdir/x",
    "files/../../x",
])
def test_a_source_outside_the_state_tree_is_refused_with_file_and_line(tree, source):
    source = source.format(outside=tree.parent.parent)
    text = f"""
        ok:
          file.managed:
            - name: /etc/ok
            - source: files/ok.txt
        /etc/x:
          file.managed:
            - source: {source}
            - template: jinja
        """
    message = refused(tree, text)
    line = line_of(text, "- source: " + source)
    assert f"s.yaml:{line}: /etc/x: source {source!r} is outside the state tree {tree}" in message
    assert SECRET not in message and "root:" not in message
    assert message.count("\n") == 0  # that one problem only: the source inside the tree is fine


@pytest.mark.parametrize("text, needle", [
    ("include:\n  - ../other\n", "../other"),
    ("include:\n  - linkdir/other\n", "linkdir/other"),
    ("a:\n  cmd.run:\n    - name: x\n{% include '../x' %}\n", "include '../x'"),
    ("a:\n  cmd.run:\n    - name: x\n{% include 'link' %}\n", "include 'link'"),
    ("{% import '../x' as x %}\na:\n  cmd.run:\n    - name: x\n", "import"),
    ("{% from 'linkdir/x' import y %}\na:\n  cmd.run:\n    - name: x\n", "from"),
    ("a:\n  cmd.run:\n    - name: x\n{% include '/etc/passwd' ignore missing %}\n", "passwd"),
])
def test_includes_and_templates_outside_the_state_tree_are_refused(tree, text, needle):
    message = refused(tree, text)
    assert f"s.yaml:{line_of(text, needle)}: " in message
    assert f"is outside the state tree {tree}" in message
    assert SECRET not in message and "evil" not in message


def test_forbidden_directories_are_refused_even_inside_the_tree(tree):
    write(tree / "state" / "master.key", SECRET)
    write(tree / "state" / "x.jinja", "{% set v = 1 %}")
    text = """
        /etc/x:
          file.managed:
            - source: state/master.key
        """
    message = refused(tree, text, forbidden=(str(tree / "state"),))
    assert f"s.yaml:{line_of(text, 'source')}: /etc/x: source 'state/master.key' is in {tree / 'state'}, " \
           "which state files may not read" in message
    assert SECRET not in message
    message = refused(tree, "{% import 'state/x.jinja' as x %}\n", forbidden=(str(tree / "state"),))
    assert "s.yaml:1: template 'state/x.jinja' is in" in message
    # Without it, the same file is an ordinary source.
    assert compile_text(tree, text)[0]["args"]["contents"] == SECRET


def test_what_the_shipped_states_do_inside_their_tree_still_works(tree):
    write(tree / "files" / "roles.jinja", "{% set who = 'me' %}")
    write(tree / "files" / "t.j2", "{% import 'roles.jinja' as roles %}{{ roles.who }}")  # next to itself
    write(tree / "common.yaml", "common:\n  cmd.run:\n    - name: c\n")
    write(tree / "sub" / "more.yaml", "more:\n  cmd.run:\n    - name: m\n")
    job = compile_text(tree, """
        include:
          - common
          - sub.more
        {% import 'files/roles.jinja' as roles with context %}
        /etc/{{ roles.who }}:
          file.managed:
            - source: salt://files/t.j2
            - template: jinja
        """)
    assert [s["id"] for s in job] == ["common", "more", "/etc/me"]
    assert job[2]["args"]["contents"] == "me"


# ---------------------------------------------------------------------------------------------
# The shipped state files compile as they did with plain Jinja (the rendering before escaping)

VARIANTS = {
    "lab": dict(cluster=None, virtualization="systemd-nspawn"),
    "pi": dict(virtualization="none", cluster={
        "name": "farm", "subnet": "10.77.0.0/24", "gateway": "10.77.0.1", "dns": ["10.77.0.1", "1.1.1.1"],
        "interface": "eth0", "network": {"confirm_timeout": 90}, "time_server": "node01",
        "time_upstream": ["ntp.example.org"], "slurm": {"partition": "batch", "max_time": "1-00:00:00"},
        "nfs": {"export": "/shared", "device": "/dev/sda1", "root_squash": False, "mode": "0775"},
        "kubernetes": {"version": "1.31", "pod_cidr": "10.245.0.0/16", "admin_user": "pi", "token_ttl": "2h",
                       "package_version": "1.31.4-1.1", "pause_image": "registry.k8s.io/pause:3.9"}}),
    "moved-master": dict(virtualization="none", moved=True, cluster={
        "subnet": "10.77.0.0/24", "dns": "9.9.9.9", "time_server": "10.77.0.1", "nfs": {"server": "10.77.0.200"},
        "kubernetes": {"version": 1.3}}),
    "no-inventory": dict(virtualization="none", entries=False),
}
JOIN = {"node01": {"kubeadm-join-command": {"changes": {"stdout": (
    "kubeadm join 10.77.0.11:6443 --token abcdef.0123456789abcdef --discovery-token-ca-cert-hash sha256:"
    + "ab" * 32 + "\nabcdef.0123456789abcdef\n")}}}}


def reference_job(path: str, context: dict, root: str) -> list[dict]:
    """The job as before: the state file rendered as plain text (the environment templated files
    use) and that text parsed as YAML. Trustworthy here because nothing in these contexts is hostile."""
    context = {k: v if callable(v) or isinstance(v, Pending) else render.to_attrdict(v) for k, v in context.items()}
    tree = statetree.state_tree(root)
    states, errors = reference_states(path, context, root, tree)
    return render._job(states, errors, context, CATALOG, tree)


def reference_states(path: str, context: dict, root: str, tree) -> tuple[list, list]:
    """A file's states as plain Jinja and YAML give them, after those of the files it includes
    (the shipped ones include by a bare name in the tree's root: hosts)."""
    text = template._env(os.path.dirname(path), tree, False).get_template(os.path.basename(path)).render(**context)
    states, includes, errors = render.parse_states(text, statetree.display_path(path, root), {})
    for state in states:
        state.file = path
        state.sls = statetree.sls_name(path, root)
    included = []
    for name, _line in includes:
        more, more_errors = reference_states(os.path.join(root, name + ".yaml"), context, root, tree)
        included += more
        errors += more_errors
    return included + states, errors


def test_the_shipped_states_compile_to_the_same_jobs_as_with_plain_jinja(tmp_path):
    # ... and validate against the agent's argument types, which every value they give fits.
    assert all("types" in spec for spec in CATALOG.values())
    compared = 0
    for name, variant in VARIANTS.items():
        site = tmp_path / name
        shutil.copytree(STATES, site)
        all_facts = {f"node0{i}": facts(i, virtualization=variant["virtualization"]) for i in range(1, 5)}
        if variant.get("moved"):
            all_facts["node01"]["ips"] = ["10.77.0.99"]
        entries = lab_entries() if variant.get("entries", True) else None
        cluster = variant.get("cluster") or shipped_cluster()
        for results in (None, JOIN):
            for node_id, context in contexts(all_facts, cluster if entries else None, entries, results).items():
                for state_file in ("network", "time", "nfs", "slurm", "kubeadm"):
                    path = str(site / f"{state_file}.yaml")
                    new = compile_for_node(path, context, CATALOG, str(site))
                    old = reference_job(path, context, str(site))
                    assert new == old, (name, node_id, state_file)
                    compared += 1
    assert compared == 160


def test_salt_indent_of_a_value_in_a_block_scalar_gives_what_salt_gives(tmp_path):
    job = compile_text(tmp_path, """
        /tmp/f:
          file.managed:
            - contents: |
                # managed
                {{ lines | join('\\n') | indent(8) }}
                {{ evil }}
        """, {"lines": ["line one", "line two", "  line three"], "evil": EVIL})
    assert job[0]["args"]["contents"] == f"# managed\nline one\nline two\n  line three\n{EVIL}\n"
    assert [s["id"] for s in job] == ["/tmp/f"]
