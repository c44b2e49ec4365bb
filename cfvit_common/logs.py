"""Where a job's logs go when a person watches it: Ray's, Ray Data's, DeepSpeed's, MLflow's logs, the workers'
output and Python warnings into one file; the terminal keeps what the job prints for the reader (its steps,
the training's epoch lines and progress records, warnings and resume notices of the training workers).

    with routed_logs("outputs/logs/pipeline-….log", verbose=False) as term:
        console = rich.console.Console(file=term)     # the terminal; everything else goes to the file
        ray_env.init_ray(...)
        forward_worker_lines(on_line)                 # after ray.init: pick the reader's lines out of the stream

The redirection is of file descriptors 1 and 2, so it also catches what C++ code and subprocesses write.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional, TextIO

PROGRESS_TAG = "[cfvit-progress] "  # a training worker's JSON progress record (drawn as a bar, never logged)
# worker lines a person should see: epoch lines, resume notices, the training loop's own warnings
READER_LINE = re.compile(r"^(epoch\s+\d+/\d+\s|\[resume\]|\[warning\])")


def log_path(folder: str | os.PathLike, name: str) -> Path:
    path = Path(folder).expanduser().resolve() / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def routed_logs(path: Optional[Path], verbose: bool = False) -> Iterator[TextIO]:
    """Yield a stream to the terminal; meanwhile fds 1 and 2 (and so `print`, logging's stream handlers,
    warnings, C++ output) write to `path`. `verbose` (or no path): nothing is redirected."""
    if verbose or path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    try:  # a stdout that is not fd 1 (a test runner's capture) stays the terminal
        own = sys.stdout.fileno() == 1
    except (AttributeError, OSError, ValueError):
        own = False
    term = open(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace") if own else sys.stdout
    with open(path, "a", buffering=1, encoding="utf-8", errors="replace") as log:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        logging.captureWarnings(True)
        warnings.simplefilter("default")  # each warning once per place, into the file
        try:
            yield term
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            logging.captureWarnings(False)
            if own:
                term.close()


def forward_worker_lines(on_line: Callable[[str], None], on_progress: Callable[[dict], None],
                         keep_progress: bool = False) -> bool:
    """Hook the driver's stream of worker output (after `ray.init(log_to_driver=True)`): progress records go
    to `on_progress`, reader lines (`READER_LINE`) to `on_line`; the rest stays with Ray's own printer
    (the log file under `routed_logs`). `keep_progress`: the records also stay in that stream (a Ray job's
    log, where `cfvit submit logs` and the failover bench read them). Returns False when this Ray has no
    such stream to hook."""
    try:  # a private Ray API: a Ray without it leaves the stream alone
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    ray_printer = next((h for name, h in dispatcher.handlers if name == "ray_print_logs"), None)
    seen: set[tuple] = set()

    def handle(data: dict) -> None:
        rest = []
        for line in data.get("lines", []):
            if line.startswith(PROGRESS_TAG):
                with contextlib.suppress(ValueError):
                    on_progress(json.loads(line[len(PROGRESS_TAG):]))
                if keep_progress:
                    rest.append(line)
            elif READER_LINE.match(line) and (data.get("pid"), line) not in seen:
                seen.add((data.get("pid"), line))
                on_line(line)
                rest.append(line)
            else:
                rest.append(line)
        if rest and ray_printer is not None:
            ray_printer({**data, "lines": rest})

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", handle)
    return True
