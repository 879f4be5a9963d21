"""What `pip install .` gives a user: the shipped state files come with every install.

Builds a wheel offline from a copy of the source tree (no network: the venv's setuptools and
wheel), installs it into a fresh directory, and asks the installed pimaster where `pimaster apply
slurm` would find `slurm`: inside the installed package, with the templates its states use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "states").glob("*.yaml"))


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def test_pip_install_ships_the_state_files_and_apply_finds_them_by_name(tmp_path):
    source = tmp_path / "src"
    _copy_tree(source)
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(wheels), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("pimaster-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"pimaster/states/{name}" in names
    assert "pimaster/states/files/slurm.conf.j2" in names  # templates the state files read
    # Every module of the source tree is in it (a new subpackage missing from pyproject's list
    # would make `pip install .` a pimaster that fails at its first import).
    for folder, package in (("master", "pimaster"), ("agent", "piagent")):
        for module in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{module.relative_to(ROOT / folder)}" in names, module

    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import json, pimaster.statetree as statetree\n"
        "d = statetree.states_dir()\n"
        "print(json.dumps({'dir': d, 'slurm': statetree.resolve_state_path('slurm', d), 'module': statetree.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PIMASTER_STATES_DIR"}
    env["PYTHONPATH"] = str(target)
    # Run from an empty directory, so that neither the source tree nor a ./slurm file is found.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=empty)
    assert found.returncode == 0, found.stderr[-3000:]
    where = json.loads(found.stdout)
    assert where["module"].startswith(str(target))  # the installed copy, not the source tree
    if where["dir"] == "/usr/share/pimaster/states":  # a .deb installed on this machine wins, as it should
        return
    assert where["dir"] == str(target / "pimaster" / "states")
    assert where["slurm"] == str(target / "pimaster" / "states" / "slurm.yaml")
