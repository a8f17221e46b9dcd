"""The quiet terminal: everything written to fds 1 and 2 (Python, C, child processes) goes
to the log file while effray's own lines and bars still reach the terminal."""

from __future__ import annotations

import json
import subprocess
import sys

from effray import console

SCRIPT = """
import os, subprocess, sys
from effray import console
with console.ray_output_to(sys.argv[1]):
    print("python print")
    print("python stderr", file=sys.stderr)
    os.write(2, b"raw fd 2\\n")  # what Ray's C++ core worker does
    subprocess.run([sys.executable, "-c", "print('from a child')"], check=True)
    console.say("[effray] a stage line")
    bar = console.bar(3, "trials", "trial")
    bar.update(3)
    bar.close()
print('{"result": 1}')
"""


def test_output_of_the_process_and_its_children_goes_to_the_log(tmp_path):
    log = tmp_path / "logs" / "ray.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, check=True)
    text = log.read_text()
    for line in ("python print", "python stderr", "raw fd 2", "from a child"):
        assert line in text and line not in done.stdout + done.stderr
    assert "[effray] a stage line" in done.stdout and "3/3" in done.stdout
    assert "[effray]" not in text and "trials" not in text
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"result": 1}  # the terminal is back afterwards


def test_none_changes_nothing(capfd):
    with console.ray_output_to(None) as path:
        print("shown")
    assert path is None and "shown" in capfd.readouterr().out


def test_follow_jsonl_sees_appended_lines(tmp_path):
    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"epoch": 0}) + "\n")  # from an earlier attempt: not reported
    seen = []
    with console.follow_jsonl(history, seen.append, every_s=0.05):
        with open(history, "a") as f:
            f.write(
                json.dumps({"epoch": 1}) + "\n" + json.dumps({"epoch": 2}) + "\n" + '{"epoch": 3'
            )  # the last is cut
    assert [r["epoch"] for r in seen] == [1, 2]
