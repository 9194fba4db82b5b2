"""emf_app/console.py: the project's lines on the terminal, everything else in the log file, with
Ray's forwarding records fed by hand (tests/test_demo_output.py runs it on a real head)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import os, sys
from emf_app.console import routed
worker = {"pid": 7, "actor_name": "RayTrainWorker", "ip": "127.0.0.1", "localhost": "127.0.0.1"}
with routed(sys.argv[1]) as console:
    console.say("[1/1] pretrain (train)")
    os.write(2, b"core_worker.cc:2465: written to the descriptor, as Ray's C++ does\\n")
    print("a library's warning", file=sys.stderr)
    console.worker_output({**worker, "is_err": False, "lines": ["step 2/4  loss 0.5", ""]})
    console.worker_output({**worker, "is_err": True, "lines": ["wandb: Tracking run"]})
    console.worker_output({**worker, "pid": "raylet", "is_err": False, "lines": ["raylet says"]})
print("stderr is back", file=sys.stderr)
"""


def test_the_terminal_gets_the_projects_lines_and_the_log_everything(tmp_path):
    log = tmp_path / "logs" / "demo.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[1/1] pretrain (train)\nstep 2/4  loss 0.5\n"  # no Ray prefix, no blank line
    assert done.stderr == "stderr is back\n"
    text = log.read_text()
    for line in ("[1/1] pretrain (train)", "core_worker.cc:2465", "a library's warning",
                 "(RayTrainWorker pid=7) step 2/4  loss 0.5", "(RayTrainWorker pid=7) wandb: Tracking run",
                 "raylet says"):
        assert line in text, text
    assert "\x1b[" not in text  # Ray's prefixes without colour codes
