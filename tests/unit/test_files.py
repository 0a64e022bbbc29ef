"""rela_tools.files: a file carries its final name only once complete, also with two writers at once."""

import os
import subprocess
import sys

import pytest
from helpers import REPO, hold_lock

from rela_tools.files import LockHeld, atomic_open, exclusive_lock, write_json

WRITER = """
import sys
from rela_tools.files import write_json
for i in range(100):
    write_json(sys.argv[1], {"writer": sys.argv[2], "payload": "x" * 5000})
"""


def test_two_processes_writing_one_file_at_once_both_succeed(tmp_path):
    # two tuning lanes record the same data's fingerprint when they start; a shared temporary name failed one of them
    target = str(tmp_path / "fingerprint.json")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, target, name], cwd=REPO, stderr=subprocess.PIPE,
                                text=True) for name in ("a", "b")]
    errors = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    with open(target, encoding="utf-8") as f:
        assert f.read().count("x") == 5000  # one writer's whole file, never a mix
    assert os.listdir(tmp_path) == ["fingerprint.json"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_writer(tmp_path):
    target = str(tmp_path / "table.md")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (int(gone.stdout), running.pid):
            with open(f"{target}.{pid}.tmp", "w") as f:
                f.write("half a table")
        with atomic_open(target) as f:
            f.write("the table\n")
        # the dead writer's leftover goes; a running writer's file is its own business
        assert sorted(os.listdir(tmp_path)) == sorted(["table.md", f"table.md.{running.pid}.tmp"])
    finally:
        running.kill()
        running.wait()


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path):
    target = str(tmp_path / "tuned.json")
    write_json(target, {"systems": ["softmax"]})
    try:
        with atomic_open(target) as f:
            f.write('{"systems": [')
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    with open(target, encoding="utf-8") as f:
        assert f.read() == '{\n  "systems": [\n    "softmax"\n  ]\n}\n'
    assert os.listdir(tmp_path) == ["tuned.json"]


def test_a_held_lock_names_its_holder_and_waits_or_refuses(tmp_path):
    path = str(tmp_path / "run.lock")
    holder = hold_lock(path)
    try:
        with pytest.raises(LockHeld) as held:
            with exclusive_lock(path, wait=False):
                pass
        assert held.value.holder == holder.pid and held.value.path == path and str(holder.pid) in str(held.value)
        waited_for = []
        holder.terminate()  # the system releases a dead holder's lock: the waiter goes on
        with exclusive_lock(path, on_wait=waited_for.append):
            with open(path) as f:
                assert f.read() == f"{os.getpid()}\n"  # the new holder's id replaced the old one's
        assert waited_for in ([holder.pid], [])  # waited for the dying holder, or found it gone already
    finally:
        holder.kill()
        holder.wait()
