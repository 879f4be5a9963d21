"""The atomic writer's clean-up of left-over temp files never removes one another writer is writing.

Two nodes writing one path on a shared file system (/clusterfs over NFS) used to fail at random
with "cannot write ...: No such file or directory": each write removed every ``.NAME.*`` temp file
next to its target, the other node's half-written one too. Now a temp file is removed only when
its writer is gone: a process of this node that no longer runs, or, for a writer this node cannot
ask (another node; a name from before writers were named), when it has not been written to for
STALE_TEMP_AGE_S. Real files in temp directories and real processes; "another node" is a process
whose origin (this boot and PID namespace, in the temp file's name) is set to another's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness import source_path
from piagent import fileio
from piagent.fileio import STALE_TEMP_AGE_S, TMP_TAG, copy_atomic, write_atomic

OTHER_NODE = "0badc0de"  # another node's origin: its PIDs mean nothing here


def temps(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith(TMP_TAG)}


def age(path: Path, seconds: float) -> None:
    """Set the file's mtime back, as if its writer had last written it ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_this_nodes_origin_is_known_and_named_in_temp_files():
    assert fileio._origin() not in (None, OTHER_NODE)
    name = os.path.basename(fileio.temp_name("/srv", "motd"))
    assert name.startswith(f".motd.{fileio._origin()}-{os.getpid()}-") and name.endswith(TMP_TAG)


def test_a_fresh_temp_file_of_another_writer_survives_a_write_of_the_same_file(tmp):
    target = tmp / "hosts"
    target.write_text("old\n")
    other_node = tmp / f".hosts.{OTHER_NODE}-4242-0123abcd{TMP_TAG}"
    unnamed = tmp / f".hosts.89abcdef{TMP_TAG}"  # a writer of before writers were named
    for path in (other_node, unnamed):
        path.write_text("half of a new ver")
        age(path, STALE_TEMP_AGE_S - 120)  # written to a while ago, but well within the hour
    write_atomic(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert temps(tmp) == {other_node.name, unnamed.name}, "a live writer's temp file was removed"
    assert other_node.read_text() == "half of a new ver"


def test_an_old_temp_file_of_another_writer_is_removed_by_the_next_write(tmp):
    target = tmp / "hosts"
    other_node = tmp / f".hosts.{OTHER_NODE}-4242-0123abcd{TMP_TAG}"
    unnamed = tmp / f".hosts.89abcdef{TMP_TAG}"
    fresh = tmp / f".hosts.{OTHER_NODE}-4343-4567abcd{TMP_TAG}"
    for path in (other_node, unnamed, fresh):
        path.write_text("left by a killed write")
    age(other_node, STALE_TEMP_AGE_S + 60)
    age(unnamed, 3 * 24 * 3600)
    write_atomic(str(target), "new\n")
    assert target.read_text() == "new\n"
    assert temps(tmp) == {fresh.name}


def test_a_temp_file_of_a_process_of_this_node_goes_when_the_process_is_gone(tmp):
    target = tmp / "motd"
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Alive: kept, however old its mtime (copy_atomic's temp carries its source's).
        alive = tmp / f".motd.{fileio._origin()}-{writer.pid}-0123abcd{TMP_TAG}"
        alive.write_text("being written")
        age(alive, 10 * STALE_TEMP_AGE_S)
        write_atomic(str(target), "one\n")
        assert temps(tmp) == {alive.name}
    finally:
        writer.kill()
        writer.wait()
    # Gone (killed mid-write, as the agent in tests/e2e/test_faults.py): removed at once.
    write_atomic(str(target), "two\n")
    assert temps(tmp) == set() and target.read_text() == "two\n"
    # This process's PID but none of its writes: an earlier process that had the PID, killed.
    earlier = tmp / f".motd.{fileio._origin()}-{os.getpid()}-0123abcd{TMP_TAG}"
    earlier.write_text("killed")
    write_atomic(str(target), "three\n")
    assert temps(tmp) == set()


def test_a_backups_left_over_temp_file_is_cleaned_up_by_the_next_backup_of_the_same_file(tmp):
    # copy_atomic's family: a killed backup under an earlier stamp is this file's left-over too.
    source = tmp / "fstab"
    source.write_text("a\n")
    killed = tmp / f".fstab.20240101T000000.{fileio._origin()}-999999999-0123abcd{TMP_TAG}"
    killed.write_text("a")
    other_file = tmp / f".fstab.d.{OTHER_NODE}-1-0123abcd{TMP_TAG}"  # fstab.d's, fresh: not ours to judge
    other_file.write_text("x")
    copy_atomic(str(source), str(tmp / "fstab.20240102T000000"), family="fstab")
    assert temps(tmp) == {other_file.name}
    assert (tmp / "fstab.20240102T000000").read_text() == "a\n"


WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from piagent import fileio
    target, origin, start, count = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
    if origin != "-":
        fileio._origin = lambda: origin  # another node: its temp files are judged by their age here
    while time.time() < start:
        time.sleep(0.001)
    failures = []
    for i in range(count):
        try:
            fileio.write_atomic(target, f"{origin} {i}\\n" * 2000)
        except OSError as exc:
            failures.append(f"{exc.strerror}: {exc.filename}")
    print(len(failures), failures[:3])
    sys.exit(1 if failures else 0)
""")


def race(tmp: Path, origins: tuple[str, str], count: int = 300) -> list[str]:
    """Two writers replacing one file at the same moments; what each printed (failures, examples)."""
    target = tmp / "shared" / "clusterfs.txt"
    target.parent.mkdir()
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, source_path(tmp), str(target), origin, str(start),
                               str(count)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for origin in origins]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    assert temps(target.parent) == set()
    assert target.read_text() in {f"{origin} {count - 1}\n" * 2000 for origin in origins}
    return outputs


def test_two_nodes_writing_one_file_on_a_shared_file_system_never_fail(tmp):
    race(tmp, ("aaaaaaaa", "bbbbbbbb"))


def test_two_processes_of_one_node_writing_one_file_never_fail(tmp):
    race(tmp, ("-", "-"))
