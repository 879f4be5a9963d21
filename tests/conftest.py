import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from harness import Agent, Master, source_path

# Tests import the working tree's packages (master/ as pimaster, agent/ as piagent).
_SOURCE = Path(tempfile.mkdtemp(prefix="pimaster-src-"))
sys.path.insert(0, source_path(_SOURCE))
atexit.register(shutil.rmtree, _SOURCE, ignore_errors=True)


@pytest.fixture
def tmp(tmp_path_factory) -> Path:
    # Short paths: the control socket path must stay under the 108-byte Unix socket limit.
    path = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)  # after the processes using it (their fixture ends first)


@pytest.fixture
def processes(request):
    started = []
    yield started
    for proc in reversed(started):
        proc.stop()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        for proc in started:
            print(f"----- {proc.log_path.name}\n{proc.output()[-4000:]}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def master(tmp, processes) -> Master:
    m = Master(tmp).start()
    processes.append(m)
    return m


@pytest.fixture
def start_agent(tmp, processes):
    def start(node_id: str, config: str, **kwargs) -> Agent:
        agent = Agent(tmp, node_id, config, **kwargs).start()
        processes.append(agent)
        return agent
    return start


# State functions run through the agent's engine, as a job runs them (test_state_modules and the rest).
@pytest.fixture
def state_dir(tmp) -> Path:
    return tmp / "agent-state"


@pytest.fixture
def run(state_dir):
    """run(fun, name, test=False, **args) -> the state's result, as the engine reports it."""
    from piagent.engine import run_states

    def run_one(fun: str, name: str, test: bool = False, **args) -> dict:
        (res,) = run_states([{"id": name, "fun": fun, "name": name, "args": args}], test=test,
                            state_dir=str(state_dir))
        return res
    return run_one
