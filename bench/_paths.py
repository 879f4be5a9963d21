"""Let the benchmarks import the working tree (master/ as pimaster, agent/ as piagent)."""

import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def use_source_tree() -> str:
    path = Path(tempfile.gettempdir()) / f"pimaster-bench-src-{os.getuid()}"
    path.mkdir(exist_ok=True)
    for name, target in (("pimaster", REPO / "master"), ("piagent", REPO / "agent")):
        link = path / name
        if not link.is_symlink():
            link.symlink_to(target)
    sys.path.insert(0, str(path))
    os.environ["PYTHONPATH"] = str(path) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return str(path)
