"""The main job's terminal: the project's lines there, everything else in a log file.

A pipeline on Ray prints far more than its own progress: Ray's driver (its core worker's
messages, logged at error level; connection banners), Ray Data and Ray Train (resource requests,
worker-group banners, checkpoint notices) and every worker's libraries (wandb's banner and run
summary, torch's deprecation warnings). All of it goes to stderr, of this process or, forwarded by
Ray, of a worker. The project's own lines go to stdout: the pipeline's step headers and prep's
summary through ``say``, the benchmark's table by print, and in a training worker rank 0's
progress line (emf_dist/train/run_logger.py).

So, inside ``routed``:
- this process's file descriptor 2 points into the log file, which catches C++ and Python
  writers alike (Ray's core worker writes to the descriptor, not to ``sys.stderr``);
- Ray's forwarding of worker output (``ray.init(log_to_driver=True)``) is replaced by
  ``Console.worker_output``: a worker's stdout lines are shown as they are, without Ray's
  ``(RayTrainWorker pid=...)`` prefix; everything a worker sends is logged with the prefix;
- ``say`` writes to the terminal and the log, so the log reads in order.
Errors still reach the terminal: a failing step's traceback is the pipeline's own line, and the
block gives stderr back before the caller reports the failure.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator

_RAY_HANDLER = "ray_print_logs"  # what ray.init names its forwarding handler; ray.shutdown removes it by name


class Console:
    def __init__(self, log_path: str):
        self.log_path = log_path
        self._lock = threading.Lock()  # Ray forwards worker output from a thread of its own

    def say(self, text: str) -> None:
        """The project's line(s): on the terminal, and in the log."""
        with self._lock:
            print(text, file=sys.stdout, flush=True)
            print(text, file=sys.stderr, flush=True)

    def worker_output(self, data: dict) -> None:
        """One batch of a Ray process's output lines (Ray's log-forwarding record)."""
        from ray._private.worker import print_to_stdstream, print_worker_logs
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC
        with self._lock:
            if data.get("is_err"):
                print_to_stdstream(data, ignore_prefix=False)  # Ray's own formatting, to sys.stderr: the log
                return
            print_worker_logs(data, sys.stderr)
            if not str(data.get("pid")).isdigit():  # the raylet's and the autoscaler's messages: Ray's
                return
            for line in data.get("lines", []):
                # Not tqdm_ray's progress state (JSON), nor the blank lines a wrapped stdout leaves
                if line.strip() and RAY_TQDM_MAGIC not in line:
                    print(line, file=sys.stdout, flush=True)

    def take_worker_output(self) -> bool:
        """Replace the forwarding handler ray.init installed (False, and Ray's prefixed lines stay,
        when there is none under Ray's name: no log_to_driver, or another Ray layout). Under the same
        name, ray.shutdown removes ours."""
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        if not any(name == _RAY_HANDLER for name, _ in dispatcher.handlers):
            return False
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler(_RAY_HANDLER, self.worker_output)
        return True


@contextlib.contextmanager
def routed(log_path: str) -> Iterator[Console]:
    """Stderr, this process's and its Ray workers', appended to ``log_path`` for the block."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fd, saved_colour = os.dup(2), os.environ.get("RAY_COLOR_PREFIX")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.environ["RAY_COLOR_PREFIX"] = "0"  # Ray reads it per line: a log file without colour codes
    try:
        yield Console(log_path)
    finally:
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        if saved_colour is None:
            os.environ.pop("RAY_COLOR_PREFIX", None)
        else:
            os.environ["RAY_COLOR_PREFIX"] = saved_colour
