"""GuardedStream (knack311/streams.py): output nobody can take is dropped, never raised."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from knack311.streams import GuardedStream, output_lost


class Refusing(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")


def test_a_refused_write_is_dropped_and_remembered():
    stream = GuardedStream(Refusing())
    assert stream.write("summary: ...\n") == len("summary: ...\n")
    assert output_lost(stream) == "Broken pipe"
    stream.write("more\n")  # dropped without trying
    stream.flush()


def test_output_to_a_full_disk_neither_raises_nor_changes_the_exit_code():
    """What the entry script does, in a process of its own: stdout on /dev/full, much written, exit code 3."""
    program = ("import sys; from knack311.streams import guard_standard_streams; guard_standard_streams(); "
               "print('x' * 100000); print('done', flush=True); sys.exit(3)")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-c", program], stdout=full, stderr=subprocess.PIPE, text=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=30)
    assert result.returncode == 3 and result.stderr == ""


def test_a_plain_stream_is_never_lost():
    assert output_lost(io.StringIO()) == ""
    stream = GuardedStream(io.StringIO())
    stream.write("line\n")
    assert output_lost(stream) == "" and stream.getvalue() == "line\n"  # the rest as the stream has it
