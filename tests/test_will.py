"""A worker's will, as a file (will.py): what the settler reads is what the worker wrote, even
once the file is gone from its directory."""

from __future__ import annotations

import os

from qless_pool.worker.will import HEADER_SIZE, Will, open_will, read_will


def test_the_will_says_the_worker_the_last_job_started_and_the_commands_owed(tmp_path):
    path = str(tmp_path / "worker-1.will")
    will = Will(path, "host-1")
    will.started({"jid": "a"})
    will.owe(["complete", "a", "host-1", "foo", '{"x": 1}'])
    will.started({"jid": "b"})
    remains = read_will(open_will(path))
    assert (remains.worker, remains.running, remains.unknown) == ("host-1", "b", False)
    assert remains.owed == [["complete", "a", "host-1", "foo", '{"x": 1}']]
    will.paid()
    assert os.path.getsize(path) == HEADER_SIZE  # the header stays: the job running, its name
    remains = read_will(open_will(path))
    assert (remains.running, remains.owed) == ("b", [])
    will.close()
    assert not os.path.exists(path)


def test_the_settler_reads_a_will_removed_after_it_was_opened(tmp_path):
    """The manager opens the will before it forks the settler: a stop may remove the pool's
    directory before the settler reads it."""
    path = str(tmp_path / "worker-2.will")
    will = Will(path, "host-2")
    will.started({"jid": "c"})
    will.owe(["retry", "c", "foo", "host-2", 0, "foo-DirtyExit", "its child died"])
    will.close(remove=False)
    fd = open_will(path)
    os.unlink(path)
    remains = read_will(fd)
    assert remains.running == "c"
    assert remains.owed == [["retry", "c", "foo", "host-2", 0, "foo-DirtyExit", "its child died"]]


def test_a_line_cut_short_or_a_command_a_worker_cannot_owe_is_left_out(tmp_path):
    path = str(tmp_path / "worker-3.will")
    will = Will(path, "host-3")
    will.owe(["complete", "d", "host-3", "foo", "{}"])
    with open(path, "ab") as file:
        file.write(b'C ["eval", "return 1", "x"]\n')  # not a qless command a worker owes
        file.write(b'C ["complete", "e", "host-3", "fo')  # the death cut it short
    assert read_will(open_will(path)).owed == [["complete", "d", "host-3", "foo", "{}"]]


def test_a_jid_too_long_for_the_header_is_said_unknown(tmp_path):
    path = str(tmp_path / "worker-4.will")
    will = Will(path, "host-4")
    will.started({"jid": "j" * 2000})
    remains = read_will(open_will(path))
    assert remains.unknown and remains.running is None
