"""`pimaster run TARGET -- CMD [ARG...]` and `--batch`/`--fail-stop` on loopback: a real master and
three real agents on 127.0.0.1, all of them on this one machine (so a command cannot tell which
node it runs on: the tests tell invocations apart by what they write, not by the node).

What a person sees: each node's output (node-prefixed lines off a terminal), a row per node, exit
status 1 when a node failed; `--json`'s contract fields; the argv run exactly as given; the job in
`pimaster jobs`/`pimaster job`; secrets redacted; output bounded; batches one after the other,
and --fail-stop leaving the later batches untouched.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness import wait_for

NODES = ("n1", "n2", "n3")


@pytest.fixture
def cluster(master, start_agent):
    config = master.token_config(uses=5)
    for node in NODES:
        start_agent(node, config)
    wait_for(lambda: master.up_nodes() == set(NODES), what="agents up")
    return master


def run(master, *args, json_out=True):
    """`pimaster run ARGS` -> (exit status, --json report or None, CompletedProcess). The global
    options go before the command: whatever follows `--` is the command's."""
    argv = [master.python, "-m", "pimaster", "--state-dir", str(master.state_dir), *(["--json"] if json_out else []),
            "run", *args]
    result = subprocess.run(argv, capture_output=True, text=True, env=master.env, timeout=120)
    report = json.loads(result.stdout) if json_out and result.stdout.strip() else None
    return result.returncode, report, result


def test_run_shows_each_nodes_output_prefixed_then_a_row_per_node(cluster):
    code, _, result = run(cluster, "*", "--", "sh", "-c", "echo out-line; echo err-line >&2", json_out=False)
    assert code == 0, result.stderr
    lines = result.stdout.splitlines()
    for node in NODES:
        assert f"{node}: out-line" in lines, result.stdout
        assert f"{node}: err-line" in result.stderr.splitlines(), result.stderr
        assert f"{node}: err-line" not in lines
    # stdout holds the nodes' output alone (`| grep n2` finds n2's lines, not its table row); the
    # table goes to stderr when stdout is not a terminal.
    assert sorted(lines) == sorted(f"{n}: out-line" for n in NODES), result.stdout
    rows = [line.split() for line in result.stderr.splitlines() if line.split()[:1] in ([n] for n in NODES)]
    assert [r[:3] for r in rows] == [[n, "ok", "0"] for n in NODES], result.stderr


def test_run_json_has_the_contract_fields(cluster):
    code, report, result = run(cluster, "n*", "--", "sh", "-c", "echo hi; echo oops >&2; exit 0")
    assert code == 0, result.stderr
    assert set(report["nodes"]) == set(NODES)
    for node in report["nodes"].values():
        assert {"ok", "rc", "stdout", "stderr", "duration_s", "status"} <= set(node)
        assert node["ok"] is True and node["rc"] == 0 and node["status"] == "done"
        assert node["stdout"] == "hi\n" and node["stderr"] == "oops\n"
        assert isinstance(node["duration_s"], (int, float))
    assert isinstance(report["job"], str)


def test_a_node_that_fails_makes_the_exit_status_non_zero(cluster, tmp):
    # The nodes share this machine: exactly one of them creates the directory, the others fail.
    once = tmp / "once"
    code, report, result = run(cluster, "*", "--shell", "--", f"mkdir {once} 2>/dev/null || exit 7")
    assert code == 1, result.stdout
    rcs = sorted(node["rc"] for node in report["nodes"].values())
    assert rcs == [0, 7, 7], report
    assert [n["ok"] for n in report["nodes"].values()].count(True) == 1
    code, _, result = run(cluster, "*", "--", "false", json_out=False)
    assert code == 1 and [line.split()[:3] for line in result.stderr.splitlines() if line.startswith("n")] == \
        [[n, "exit", "1"] for n in NODES], result.stderr


def test_argv_runs_exactly_as_given(cluster):
    words = ["a b", "it's", '"quoted"', "$HOME", "*", "--", "", "back\\slash", "; rm -rf /", "-n"]
    code, report, result = run(cluster, "n1", "--", "printf", "[%s]\\n", *words)
    assert code == 0, result.stderr
    assert report["nodes"]["n1"]["stdout"] == "".join(f"[{w}]\n" for w in words)


def test_shell_runs_one_command_line_through_sh(cluster):
    code, report, result = run(cluster, "n2", "--shell", "--", "echo $((40 + 2)) | tr 4 X")
    assert code == 0, result.stderr
    assert report["nodes"]["n2"]["stdout"] == "X2\n"
    code, _, result = run(cluster, "n2", "--shell", "--", "echo", "two words")
    assert code == 2 and "one string" in result.stderr


def test_usage_errors_send_nothing(cluster):
    for args in (["*"], ["*", "--"], ["nomatch*", "--", "true"]):
        code, report, result = run(cluster, *args)
        assert code == 2, (args, result.stdout, result.stderr)
        assert "error" in report
    assert cluster.json("jobs")["jobs"] == []


def test_a_run_is_recorded_as_a_job(cluster):
    code, report, _ = run(cluster, "n3", "--", "echo", "recorded")
    assert code == 0
    jobs = cluster.json("jobs")["jobs"]
    assert [(j["id"], j["file"], j["target"]) for j in jobs] == [(report["job"], "run: echo recorded", "n3")]
    table = cluster.cli("jobs").stdout
    assert "run: echo recorded" in table
    shown = cluster.cli("job", report["job"]).stdout
    assert "n3: recorded" in shown.splitlines() and report["job"] in shown
    again = cluster.json("job", report["job"])
    assert again["nodes"]["n3"]["stdout"] == "recorded\n" and again["nodes"]["n3"]["rc"] == 0


def test_secrets_are_redacted_from_output_and_the_job_list(cluster):
    secrets = cluster.state_dir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    value = "s3cr3t-" + os.urandom(8).hex()
    (secrets / "db.password").write_text(value)
    code, report, result = run(cluster, "n1", "--", "echo", value)
    assert code == 0
    assert value not in result.stdout
    assert report["nodes"]["n1"]["stdout"] == "[secret db.password]\n"
    _, _, plain = run(cluster, "n1", "--", "echo", value, json_out=False)
    assert value not in plain.stdout + plain.stderr and "n1: [secret db.password]" in plain.stdout
    listed = cluster.cli("jobs").stdout + json.dumps(cluster.json("job", report["job"]))
    assert value not in listed and "run: echo [secret db.password]" in listed


def test_no_part_of_a_secret_survives_cuts_and_cleaning(cluster):
    """Text is cut and cleaned after it is redacted: a secret past the jobs list's 200 characters,
    at the edge of the agent's 64 KiB of output, with CR LF line ends, or over a line break in a
    state's one-line name, leaves no part of itself behind."""
    secrets = cluster.state_dir / "secrets"
    secrets.mkdir(mode=0o700, exist_ok=True)
    value = "S3cr3tMungeKey-" + os.urandom(8).hex()
    (secrets / "munge.key").write_text(value)
    pem = "-----BEGIN KEY-----\r\n" + os.urandom(24).hex() + "\r\n-----END KEY-----"
    (secrets / "tls.key").write_text(pem)
    two_lines = "line-one-" + os.urandom(4).hex() + "\nline-two-" + os.urandom(4).hex()
    (secrets / "two.lines").write_text(two_lines)
    stored = []
    # Past the label's cut: the jobs list shows no part of it.
    code, report, result = run(cluster, "n1", "--shell", "--", f"echo {'x' * 170} {value} > /dev/null")
    assert code == 0, result.stderr
    stored.append(cluster.cli("jobs").stdout + json.dumps(cluster.json("job", report["job"])))
    # Cut by the agent's clip at 64 KiB, its first 40 characters before the mark.
    code, report, result = run(cluster, "n1", "--shell", "--", f"head -c {64 * 1024 - 40} /dev/zero | tr '\\0' y; "
                                                                 f"printf %s {value}{value}")
    assert code == 0 and "[secret munge.key, clipped]" in report["nodes"]["n1"]["stdout"], result.stdout[-300:]
    stored.append(result.stdout + json.dumps(cluster.json("job", report["job"])))
    # CR LF, and a line break in the state's name (a --shell heredoc).
    code, report, result = run(cluster, "n1", "--", "printf", "%s", pem)
    assert code == 0 and report["nodes"]["n1"]["stdout"] == "[secret tls.key]", report
    stored.append(result.stdout + json.dumps(cluster.json("job", report["job"])))
    code, report, result = run(cluster, "n1", "--shell", "--", f"cat > /dev/null <<'EOF'\n{two_lines}\nEOF")
    assert code == 0, result.stderr
    stored.append(result.stdout + json.dumps(cluster.json("job", report["job"])) + cluster.cli("jobs").stdout)
    for text in stored:
        for secret in (value, pem, two_lines):
            for piece in (secret[:12], secret[-12:], secret.replace("\r", "?"), secret.replace("\n", " ")):
                assert piece not in text, (piece, text[-500:])


def test_output_is_bounded(cluster):
    code, report, result = run(cluster, "n1", "--shell", "--", "yes | head -c 1000000")
    assert code == 0, result.stdout[:3000]
    stdout = report["nodes"]["n1"]["stdout"]
    assert len(stdout) < 70_000 and stdout.endswith("[... output clipped]"), len(stdout)
    # Binary output is kept too, its control characters shown as `?`: the bound counts what is kept,
    # not the six-character escapes JSON would have written for each byte.
    code, report, result = run(cluster, "n1", "--shell", "--", "head -c 1000000 /dev/zero")
    assert code == 0, result.stdout[:3000]
    stdout = report["nodes"]["n1"]["stdout"]
    assert stdout.startswith("?" * 1000) and stdout.endswith("[... output clipped]"), stdout[:200]


def intervals(directory) -> list[tuple[float, float]]:
    """(start, end) of each invocation of `STAMP`, sorted by start."""
    spans = []
    for path in directory.iterdir():
        stamps = path.read_text().split()
        assert len(stamps) == 2, stamps
        spans.append((float(stamps[0]), float(stamps[1])))
    return sorted(spans)


def stamp(directory) -> str:
    """A command line that writes its start and end time to a file of its own in ``directory``."""
    return f"f=$(mktemp -p {directory}); date +%s.%N >> $f; sleep 0.3; date +%s.%N >> $f"


def test_batch_1_starts_no_batch_before_the_last_one_finished(cluster, tmp):
    stamps = tmp / "stamps"
    stamps.mkdir()
    code, _, result = run(cluster, "*", "--batch", "1", "--shell", "--", stamp(stamps), json_out=False)
    assert code == 0, result.stderr
    spans = intervals(stamps)
    assert len(spans) == 3
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans
    # The batches are announced, one node each (on stderr: stdout is the nodes' output).
    assert [line for line in result.stderr.splitlines() if line.startswith("batch ")] == \
        [f"batch {i}: {n}" for i, n in enumerate(NODES, 1)], result.stderr


def test_fail_stop_leaves_the_later_batches_untouched(cluster, tmp):
    stamps = tmp / "stamps"
    stamps.mkdir()
    # The first invocation fails (exit 3); any later one would succeed.
    command = f"{stamp(stamps)}; mkdir {tmp}/failed-once 2>/dev/null && exit 3; exit 0"
    code, report, _ = run(cluster, "*", "--batch", "1", "--fail-stop", "--shell", "--", command)
    assert code == 1
    assert len(intervals(stamps)) == 1       # the later batches never ran it
    nodes = report["nodes"]
    assert nodes["n1"]["rc"] == 3 and not nodes["n1"]["ok"]
    assert {n: nodes[n]["status"] for n in ("n2", "n3")} == {"n2": "not_sent", "n3": "not_sent"}
    assert "n1 failed" in report["stopped"]
    # The record says so too, and the table says why.
    shown = cluster.cli("job", report["job"], check=False).stdout
    assert "not sent" in shown and "stopped: --fail-stop: n1 failed" in shown, shown


def test_without_fail_stop_every_batch_runs(cluster, tmp):
    stamps = tmp / "stamps"
    stamps.mkdir()
    command = f"{stamp(stamps)}; mkdir {tmp}/failed-once 2>/dev/null && exit 3; exit 0"
    code, report, _ = run(cluster, "*", "--batch", "50%", "--shell", "--", command)
    assert code == 1 and len(intervals(stamps)) == 3
    assert sorted(n["rc"] for n in report["nodes"].values()) == [0, 0, 3]


def test_apply_batch_fail_stop_leaves_the_later_batches_untouched(cluster, tmp):
    stamps = tmp / "stamps"
    stamps.mkdir()
    state = tmp / "states" / "stamp.yaml"
    state.parent.mkdir()
    state.write_text(f"stamp:\n  cmd.run:\n    - name: '{stamp(stamps)}; "
                     f"mkdir {tmp}/failed-once 2>/dev/null && exit 3; exit 0'\n")
    result = cluster.cli("apply", str(state), "--batch", "2", "--fail-stop", check=False, timeout=120)
    assert result.returncode == 1
    assert len(intervals(stamps)) == 2        # n1 and n2; n3's batch never started
    assert "batch 1: n1, n2" in result.stdout and "batch 2" not in result.stdout, result.stdout
    assert "stopped: --fail-stop:" in result.stdout
    job = cluster.json("job", "last", check=False)
    assert job["nodes"]["n3"]["result"] == "not sent" and job["stopped"].startswith("--fail-stop:")
    assert [job["nodes"][n]["status"] for n in ("n1", "n2")] == ["done", "done"]


def test_a_command_past_its_timeout_is_ended_and_says_so(cluster):
    code, report, _ = run(cluster, "n1", "--timeout", "1", "--", "sleep", "30")
    node = report["nodes"]["n1"]
    assert code == 1 and node["status"] == "timed_out" and node["rc"] == 124 and not node["ok"], node
    assert "timed out" in node["error"]


def test_a_node_that_does_not_answer_is_named_and_fails_the_run(master, start_agent):
    config = master.token_config(uses=5)
    agents = {node: start_agent(node, config) for node in ("n1", "n2")}
    wait_for(lambda: master.up_nodes() == {"n1", "n2"}, what="agents up")
    agents["n2"].stop()
    code, report, result = run(master, "*", "--", "echo", "here")
    assert code == 1, result.stderr
    assert report["nodes"]["n1"]["ok"] and report["nodes"]["n1"]["stdout"] == "here\n"
    assert report["nodes"]["n2"]["status"] == "no_answer" and not report["nodes"]["n2"]["ok"]
    assert report["nodes"]["n2"]["error"], report


def test_job_cancel_stops_a_run(cluster):
    from harness import processes_running, unique_sleep

    sleep = unique_sleep(60)
    argv = [cluster.python, "-m", "pimaster", "--state-dir", str(cluster.state_dir), "--json", "run", "n1", "--", *sleep]
    running = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    try:
        wait_for(lambda: processes_running(sleep), what="the command to run on n1")
        job_id = cluster.json("jobs")["jobs"][0]["id"]
        cancelled = cluster.json("job", "cancel", job_id)
        assert cancelled["nodes"]["n1"]["result"] == "cancelled", cancelled
        out, err = running.communicate(timeout=60)
    finally:
        running.kill()
    assert running.returncode == 1, err
    assert json.loads(out)["nodes"]["n1"]["status"] == "interrupted"
    assert not processes_running(sleep)


def test_everything_after_the_dashes_is_the_command_word_for_word():
    from pimaster import cli
    from pimaster.commands import load

    def parsed(*argv):
        return cli._parser("run", load("run")).parse_args(["run", *argv])

    args = parsed("*", "--batch", "25%", "--fail-stop", "--timeout", "2m", "--", "echo", "--", "--json", "-n", "")
    assert args.command == ["echo", "--", "--json", "-n", ""]
    assert (args.target, args.batch, args.fail_stop, args.timeout, args.json) == ("*", "25%", True, 120.0, False)
    for bad in (["*", "--batch", "0", "--", "true"], ["*", "--batch", "101%", "--", "true"],
                ["*", "uname", "--", "-n"], ["n1", "uptime"], ["n1", "uname", "-n"]):
        with pytest.raises(SystemExit):
            parsed(*bad)
