"""The master's fact schema: what a real agent reports passes whole; what a hostile one adds is refused."""

import asyncio
import json

from piagent.facts import gather_facts
from piagent.states import catalog
from pimaster.facts import MAX_FACTS_BYTES, check_catalog, check_facts, missing_facts
from pimaster.results import check_job_result


def test_this_machines_real_facts_pass_unchanged():
    facts = asyncio.run(gather_facts())
    kept, problems = check_facts(facts)
    assert problems == []
    assert kept == json.loads(json.dumps(facts))
    assert missing_facts(kept) == []


def test_hostile_facts_are_refused_one_by_one_and_never_kept():
    facts = asyncio.run(gather_facts())
    hostile = dict(facts,
                   hostname="good01\nevil:\n  cmd.run:\n    - name: touch /tmp/x",
                   interfaces=[{"name": "eth0\n/etc/x:\n  file.managed: []", "mac": "aa:bb:cc:dd:ee:ff",
                                "addresses": ["10.0.0.5/24"]},
                               {"name": "eth1", "mac": "not a mac", "addresses": ["10.0.0.6/24", "x/24"]}],
                   ips=["10.0.0.5", "10.0.0.5\nx"], cpu_count="4", memory_mb=True,
                   interface="eth0; reboot", role="controller")
    kept, problems = check_facts(hostile)
    assert "hostname" not in kept and "cpu_count" not in kept and "memory_mb" not in kept
    assert "interface" not in kept and "role" not in kept            # unknown facts never reach a template
    assert kept["interfaces"] == [{"name": "eth1", "mac": None, "addresses": ["10.0.0.6/24"]}]
    assert kept["ips"] == ["10.0.0.5"]
    assert len(problems) == 7, problems
    assert all("\n" not in p for p in problems)                      # one log line each
    assert set(missing_facts(kept)) == {"hostname", "cpu_count", "memory_mb"}


def test_facts_that_are_not_plain_data_or_too_large_are_refused_whole():
    assert check_facts({"hostname": b"bytes"})[0] == {}
    assert check_facts({"cpu_count": float("nan")})[0] == {}
    kept, problems = check_facts({"pi_model": "x" * (MAX_FACTS_BYTES + 1)})
    assert kept == {} and "limit" in problems[0]
    assert check_facts([1, 2])[0] == {}


def test_catalogue_of_a_real_agent_passes_and_a_malformed_one_is_refused():
    real = catalog()
    assert check_catalog(real) == (real, None)
    for bad in ({"file.managed": {"args": ["name"], "required": ["nope"]}},
                {"x\ny.z": {"args": []}}, {"file.managed": {"args": [["list"]]}}, [], {}):
        assert check_catalog(bad)[0] is None


def test_argument_types_in_a_catalogue_are_a_bounded_map_of_its_arguments_to_known_type_names():
    entry = {"args": ["name", "mode"], "required": [], "summary": ""}
    typed = {"file.managed": dict(entry, types={"name": ["str"], "mode": ["str", "int", "null"]})}
    assert check_catalog(typed) == (typed, None)
    untyped = {"file.managed": entry}                                # an older agent: no types at all
    assert check_catalog(untyped) == (untyped, None)
    assert "types" not in check_catalog(untyped)[0]["file.managed"]
    for bad in (None, [], "str", {"nope": ["str"]},                  # not a map; an argument it does not have
                {"mode": []}, {"mode": "str"}, {"mode": ["string"]},  # empty, not a list, not in the vocabulary
                {"mode": ["int", "int"]}, {"mode": [["str"]]},       # repeated, not a name
                {"mode": ["str"] * 10_000}, {1: ["str"]}):
        catalogue, problem = check_catalog({"file.managed": dict(entry, types=bad)})
        assert catalogue is None and problem == "malformed catalogue entry 'file.managed'", bad


def test_job_results_are_counted_by_the_master_not_believed():
    body = {"job": "j", "summary": {"failed": float("nan"), "ok": 10 ** 9},
            "results": [{"id": "a", "fun": "cmd.run", "name": "a", "result": True, "changes": {"x": 1},
                         "comment": "", "status": "changed"},
                        "not a dict",
                        {"id": "c", "result": "yes", "changes": {"v": float("inf")}}],
            "started": float("nan"), "finished": 5}
    checked = check_job_result(body, states=3)
    assert checked["summary"] == {"ok": 0, "changed": 1, "failed": 2, "not_run": 0, "skipped": 0}
    assert checked["started"] is None and checked["finished"] == 5
    assert "refused" in checked["results"][2]["changes"]
    json.dumps(checked, allow_nan=False)                             # storable, showable
    assert check_job_result(body, states=2) is None                  # more results than states sent


def test_health_of_a_real_agent_passes_and_garbage_is_left_out():
    from piagent.facts import health
    from pimaster.results import check_health

    real = asyncio.run(health())
    assert check_health(real) == real
    garbage = {"uptime_s": float("nan"), "load": ["x", 1, 2], "temp_c": "hot", "throttled": "0x5\n",
               "throttled_flags": ["under-voltage"], "disk_root_used_pct": 1e300, "disk_root_free_mb": -1,
               "time": float("inf")}
    assert check_health(garbage) == {}


def test_addresses_with_odd_scopes_and_results_with_escape_sequences_are_refused_or_cleaned():
    kept, problems = check_facts({"ips": ["fe80::1%eth0", "fe80::1%\n\x1b[1A\x1b[2Kgood01 ok", "10.0.0.1"]})
    assert kept["ips"] == ["fe80::1%eth0", "10.0.0.1"]
    checked = check_job_result({"results": [{"id": "a\x1b[2J", "fun": "cmd.run [/x]", "name": "n",
                                             "result": False, "changes": ["a list"], "comment": "\x1b]0;x\x07ok"}],
                                "started": -1e308, "finished": 1e308}, states=1)
    state = checked["results"][0]
    assert state["id"] == "a?[2J" and state["fun"] == "?" and state["comment"] == "?]0;x?ok"
    assert "refused" in state["changes"] and checked["started"] is None and checked["finished"] is None
