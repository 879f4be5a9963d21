"""A corpus of broken state files (tests/corpus/broken): each is refused at the master, before
anything reaches a node, with the file, the line and the reason, and never a Python traceback."""

import re
import tempfile
from pathlib import Path

import pytest

from harness import Agent, Master, wait_for

CORPUS = Path(__file__).parent / "corpus" / "broken"
FILES = sorted(p.name for p in CORPUS.iterdir() if p.suffix == ".yaml")


@pytest.fixture(scope="module")
def target():
    tmp = Path(tempfile.mkdtemp(prefix="pm-corpus-", dir="/tmp"))
    master = Master(tmp).start()
    agent = Agent(tmp, "n1", master.token_config()).start()
    try:
        wait_for(lambda: master.up_nodes() == {"n1"}, what="n1 up")
        yield master, agent
    finally:
        agent.stop()
        master.stop()


def test_the_corpus_is_large_enough():
    assert len(FILES) >= 30


@pytest.mark.parametrize("name", FILES)
def test_broken_file_is_refused_with_file_and_line(target, name):
    master, agent = target
    jobs_before = len(master.json("jobs")["jobs"])
    result = master.cli("apply", str(CORPUS / name), check=False)
    assert result.returncode != 0
    message = result.stderr
    assert "nothing was sent" in message, message
    assert re.search(re.escape(name) + r":\d+: \S", message), message
    assert "Traceback" not in message + result.stdout
    assert len(master.json("jobs")["jobs"]) == jobs_before  # nothing reached a node
    assert not (agent.state_dir / "jobs").exists()
