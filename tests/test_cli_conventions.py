"""What every `pimaster` command shares (issue 17, items 10 and 12): global options before or after
the command; one target syntax (globs on node ids, role:NAME, FACT=GLOB) and one duration syntax (`5`,
`2s`, `1m`, `24h`); with --json, errors as a JSON object on stdout; exit statuses that tell a node
that failed (1) from refused input (2) and from no master to talk to (3).

Loopback: a real master and agents where the master must answer; a state dir with no master in it
for an unreachable one.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest

from harness import source_path, wait_for

from pimaster import cli
from pimaster.commands import Handler, load
from pimaster.errors import ControlError


def pimaster(tmp, *args, env=None):
    environ = dict(os.environ, PYTHONPATH=source_path(tmp))
    environ.pop("PIMASTER_STATE_DIR", None)
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "pimaster", *args], capture_output=True, text=True, env=environ,
                          timeout=120)


def json_error(result) -> dict:
    """The one JSON error object a failed `--json` command prints on stdout (with its message on stderr)."""
    data = json.loads(result.stdout)
    assert isinstance(data["error"], str) and data["error"] and isinstance(data["code"], str), data
    assert data["error"].splitlines()[0] in result.stderr, (data, result.stderr)
    return data


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# ---------------------------------------------------------------------------------- no master

def test_global_options_go_before_or_after_the_command(tmp):
    none = str(tmp / "none")
    for args in (["--state-dir", none, "ping"], [f"--state-dir={none}", "ping"], ["ping", "--state-dir", none],
                 ["--json", "--state-dir", none, "status"], ["--state-dir", none, "token", "list", "--json"],
                 ["--state-dir", "/elsewhere", "nodes", "--state-dir", none]):   # after the command wins
        result = pimaster(tmp, *args)
        assert "no master running" in result.stderr and none in result.stderr, (args, result)
        assert "Traceback" not in result.stderr
    # The environment still names it when no option does.
    result = pimaster(tmp, "ping", env={"PIMASTER_STATE_DIR": none})
    assert none in result.stderr, result
    # --json before a command that has no JSON output is a usage error, not silently ignored.
    result = pimaster(tmp, "--json", "serve", "--state-dir", none)
    assert result.returncode == 2 and "serve has no --json" in result.stderr, result
    assert json_error(result)["code"] == "usage"


def test_an_unreachable_master_exits_3_with_a_json_error(tmp):
    none = str(tmp / "none")
    (tmp / "x.yaml").write_text("hello:\n  cmd.run:\n    - name: true\n")
    for args in (["ping", "--json"], ["--json", "nodes"], ["status", "--json"], ["keys", "list", "--json"],
                 ["apply", str(tmp / "x.yaml"), "--json"], ["job", "20260101-000000-abcdef", "--json"]):
        result = pimaster(tmp, *args, "--state-dir", none)
        assert result.returncode == 3, (args, result)
        error = json_error(result)
        assert error["code"] == "unreachable" and "no master running" in error["error"], (args, error)
    # A state file that is not there is found out here, before any master is asked (as refused input).
    result = pimaster(tmp, "apply", "states/x.yaml", "--json", "--state-dir", none)
    assert result.returncode == 2 and json_error(result)["error"].endswith("states/x.yaml: no such state file")
    # Without --json: the message on stderr, nothing on stdout, the same status.
    result = pimaster(tmp, "ping", "--state-dir", none)
    assert result.returncode == 3 and result.stdout == "" and "no master running" in result.stderr


def test_usage_errors_with_json_are_json(tmp):
    result = pimaster(tmp, "ping", "--timeout", "soon", "--json")
    assert result.returncode == 2 and "'soon' is not a duration" in result.stderr, result
    assert json_error(result)["code"] == "usage"
    result = pimaster(tmp, "--json", "ping", "--frobnicate")
    assert result.returncode == 2 and json_error(result)["code"] == "usage"


def test_one_duration_and_one_target_syntax():
    def parsed(*argv):
        name = argv[0]
        return cli._parser(name, load(name)).parse_args(list(argv))

    # Durations: plain seconds as before, or with a unit, for every command that takes one.
    for text, seconds in (("5", 5.0), ("2s", 2.0), ("1.5", 1.5), ("1m", 60.0), ("10m", 600.0)):
        assert parsed("ping", "--timeout", text).timeout == seconds
    assert parsed("ping").timeout == 5.0
    assert parsed("apply", "x.yaml", "--timeout", "5").timeout == 5.0
    assert parsed("apply", "x.yaml", "--timeout", "1h").timeout == 3600.0
    assert parsed("token", "create", "--ttl", "2h").ttl == 7200.0
    for command, option, bad in (("ping", "--timeout", "11m"), ("ping", "--timeout", "0"),
                                 ("ping", "--timeout", "nan"), ("token", "--ttl", "31d")):
        argv = ["token", "create", option, bad] if command == "token" else [command, option, bad]
        with pytest.raises(SystemExit) as exit_:
            parsed(*argv)
        assert exit_.value.code == 2, argv
    # Targets: ping's positional TARGET stays; --target is the same; both alike are fine.
    assert parsed("ping", "pi*").target == "pi*"
    assert parsed("ping", "--target", "role:compute").target == "role:compute"
    assert parsed("ping", "n1", "--target", "n1").target == "n1"
    assert parsed("ping").target is None
    for argv in (["ping", "n1", "--target", "n2"], ["ping", "rol:compute"], ["ping", "--target", "role:"]):
        with pytest.raises(SystemExit):
            parsed(*argv)
    # What a target means: a glob on the id, or the nodes that have the role.
    assert cli.target_matches(None, "n1", []) and cli.target_matches("*", "n1", [])
    assert cli.target_matches("n[12]", "n1", []) and not cli.target_matches("n[23]", "n1", ["n2"])
    assert cli.target_matches("role:compute", "n1", ["gpu", "compute"])
    assert not cli.target_matches("role:compute", "compute", [])


def test_targets_take_comma_lists_facts_and_terms_that_all_must_match():
    from pimaster.facts import SCHEMA
    from pimaster.targets import MATCHABLE_FACTS, UNMATCHABLE_FACTS, compile_target

    def parsed(*argv):
        return cli._parser(argv[0], load(argv[0])).parse_args(list(argv))

    # Every command that takes a target takes the whole syntax, `nodes` and `jobs` too.
    for argv in (["ping", "role:compute arch=arm64"], ["nodes", "node01,node03"], ["nodes", "--target", "arch=arm64"],
                 ["apply", "x.yaml", "--target", 'model="*Pi 5*"'], ["jobs", "--target", "os_codename=bookworm"]):
        assert parsed(*argv).target == argv[-1], argv
    # Refused by the parser (2) before anything is sent, each with its reason.
    for bad, says in (("colour=red", "no fact 'colour'"), ("ips=10.*", "ips is a list"), ("os=debian", "os is a map"),
                      ("arch=", "needs a glob"), ("node01,", "empty item"), ("'node01", "not closed"),
                      ("foo:bar", "node ids hold no ':'"), ("role:", "role's name"), ("x" * 257, "at most 256")):
        with pytest.raises(cli.argparse.ArgumentTypeError, match=says):
            cli.parse_target(bad)
        with pytest.raises(ControlError):
            cli.checked_target(bad)
    # Every fact the master keeps is matchable or says why not: a new fact must choose.
    assert {key for key, _ in MATCHABLE_FACTS.values()} | set(UNMATCHABLE_FACTS) == set(SCHEMA)

    pi5 = {"arch": "arm64", "pi_model": "Raspberry Pi 5 Model B Rev 1.0", "cpu_count": 4, "systemd": True,
           "os": {"ID": "debian", "VERSION_CODENAME": "bookworm"}, "ips": ["10.0.0.5"]}
    def matches(target, node_id="node05", roles=(), facts=pi5):
        return cli.target_matches(target, node_id, roles, facts)

    assert matches("arch=arm64") and matches("model=*Pi?5*") and matches('model="*Pi 5*"')
    assert matches("os_codename=bookworm os_id=debian") and matches("cpu_count=4 systemd=true")
    assert not matches("arch=arm64 os_codename=bullseye")  # every term must match
    assert matches("node01,node05") and not matches("node01,node03") and matches("node0[4-6],x arch=arm*")
    assert matches("role:compute arch=arm64", roles=["compute"]) and not matches("role:compute arch=arm64")
    # A word after FACT=GLOB that starts no term continues its glob; node globs go first or as id=.
    assert matches("model=*Pi 5*") and matches("node05 model=*Pi 5* Model B*") and matches("model=*Pi 5* id=node05")
    assert not matches("model=*Pi 5* node05") and not matches("model=*Pi 5* id=node01")
    # !TERM leaves out what TERM matches, whatever its kind; it always starts a term of its own.
    assert matches("* !node04") and not matches("* !node05") and matches("!node0[1-4]")
    assert not matches("!role:compute", roles=["compute"]) and matches("!role:gpu", roles=["compute"])
    assert matches("!arch=armhf") and not matches("node0* !arch=arm*") and not matches("model=*Pi 5* !node05")
    for bad in ("!", "!*", "!!node01"):
        with pytest.raises(cli.argparse.ArgumentTypeError, match="leaves out"):
            cli.parse_target(bad)
    # A node without the fact, or with it as something other than one value, matches no fact term.
    assert not matches("pi_serial=*") and not matches("arch=*", facts=None)
    assert not matches("arch=*", facts={"arch": ["arm64"]}) and not matches("os_codename=*", facts={"os": "bookworm"})
    # A fact is data: a model of `*` is matched, never used as the pattern; an overlong value matches nothing.
    assert not matches("model=Raspberry*", facts={"pi_model": "*"}) and matches("model=[*]", facts={"pi_model": "*"})
    assert not matches("model=*", facts={"pi_model": "x" * 5000})
    assert compile_target("*").terms == () and compile_target("node01,pi*").id_globs() == ("node01", "pi*")
    assert compile_target("node01 arch=arm64").id_globs() is None


def test_the_control_socket_says_what_kind_of_error():
    from pimaster.control import ControlServer

    async def refuse(master):
        raise ControlError("no such thing")

    async def crash(master):
        raise KeyError("bug")

    server = ControlServer("/nonexistent", None, {"refuse": Handler("refuse", refuse, False),
                                                  "crash": Handler("crash", crash, False)})
    ask = lambda line: asyncio.run(server.request(line))  # noqa: E731
    assert ask(b'{"cmd": "refuse"}') == {"error": "no such thing", "code": "refused"}
    assert ask(b'{"cmd": "refuse", "args": {"extra": 1}}')["code"] == "refused"
    assert ask(b'{"cmd": "nothing"}')["code"] == "refused"
    crashed = ask(b'{"cmd": "crash"}')
    assert crashed["code"] == "internal" and crashed["error"].startswith("internal error: KeyError")


# ---------------------------------------------------------------------------------- with a master

def test_ping_takes_durations_targets_and_roles_as_apply_does(tmp, master, start_agent):
    config = master.token_config(uses=5)
    for node_id in ("n1", "n2"):
        start_agent(node_id, config)
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")

    def ping(*args):
        result = master.cli("ping", *args, "--json", check=False)
        return result, json.loads(result.stdout)

    site = tmp / "site"
    write(site / "cluster.yaml", """
        cluster:
          name: test
        nodes:
          - id: n1
            roles: [compute, gpu]
          - id: n2
            roles: [controller]
        """)
    state = write(site / "touch.yaml", f"""
        {tmp}/touched-{{{{ node.id }}}}:
          file.managed:
            - contents: here
        """)
    applied = master.cli("apply", str(state), "--target", "role:compute", "--timeout", "1m", "--json", check=False)
    assert applied.returncode == 0 and list(json.loads(applied.stdout)["nodes"]) == ["n1"], applied
    # ping and apply agree on what role:compute is, positional or --target.
    for args in (["role:compute"], ["--target", "role:compute"]):
        result, data = ping(*args)
        assert result.returncode == 0 and [n["id"] for n in data["nodes"]] == ["n1"], (args, result)
    result, data = ping("role:controller")
    assert [n["id"] for n in data["nodes"]] == ["n2"], result

    result, data = ping("--timeout", "2s")
    assert result.returncode == 0 and [n["id"] for n in data["nodes"]] == ["n1", "n2"], result
    result, data = ping("--target", "n2", "--timeout", "3")
    assert result.returncode == 0 and [n["id"] for n in data["nodes"]] == ["n2"], result
    # Global options before the command, with a master.
    before = subprocess.run([master.python, "-m", "pimaster", "--json", "--state-dir", str(master.state_dir), "ping",
                             "n1"], capture_output=True, text=True, env=master.env, timeout=60)
    assert before.returncode == 0 and [n["id"] for n in json.loads(before.stdout)["nodes"]] == ["n1"], before

    # A target that matches nothing is refused input (2), as apply refuses it; the JSON keeps "nodes".
    result, error = ping("role:storage")
    assert result.returncode == 2 and error["code"] == "refused" and error["nodes"] == [], result
    assert "no accepted node matches role:storage" in result.stderr
    result, error = ping("x*")
    assert result.returncode == 2 and error["nodes"] == [] and "no accepted node matches x*" in error["error"]


def test_exit_statuses_tell_failed_from_refused_from_unreachable(tmp, master, start_agent):
    config = master.token_config(uses=5)
    agents = [start_agent(node_id, config) for node_id in ("n1", "n2")]
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")

    # Refused input: 2, with the master's message as a JSON error (and on stderr).
    broken = write(tmp / "site" / "broken.yaml", """
        oops:
          file.managed:
            - contents: [unclosed
        """)
    for args in (("apply", str(broken)), ("job", "20260101-000000-abcdef"), ("token", "revoke", "nope"),
                 ("keys", "fingerprint", "nobody")):
        result = master.cli(*args, "--json", check=False)
        assert result.returncode == 2, (args, result)
        error = json_error(result)
        assert error["code"] == "refused", (args, error)
    assert "refused, nothing was sent" in json_error(master.cli("apply", str(broken), "--json", check=False))["error"]
    # The master checks a target too (another client may send anything).
    from pimaster.client import ControlClient

    for bad in (5, "foo:bar", "role:", "x" * 300):
        with pytest.raises(ControlError) as refused:
            ControlClient(str(master.state_dir)).call("ping", target=bad, timeout=1)
        assert refused.value.code == "refused", (bad, refused.value)
    # Roles come from an inventory (next to the last applied file): before any apply there is none.
    result = master.cli("ping", "role:compute", "--json", check=False)
    assert result.returncode == 2 and "cluster.yaml" in json_error(result)["error"], result

    # A node down: 1, and the usual report on stdout (no error object: the command did its job).
    agents[0].kill()
    result = master.cli("ping", "--timeout", "1", "--json", check=False)
    assert result.returncode == 1 and "error" not in json.loads(result.stdout), result

    # No master: 3.
    master.stop()
    result = master.cli("status", "--json", check=False)
    assert result.returncode == 3 and json_error(result)["code"] == "unreachable", result
