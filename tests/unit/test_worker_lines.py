"""The driver's stream of worker output, picked apart by `forward_worker_lines` on Ray's own dispatcher: a
person's terminal gets the epoch lines and a bar; a Ray job's log (verbose) keeps every line, the progress
records too (`cfvit submit logs` and `cfvit bench train-failover` read them there)."""
import json

import pytest
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from cfvit_common.logs import PROGRESS_TAG, forward_worker_lines

RECORD = {"epoch": 2, "epochs": 3, "step": 5}
LINES = [PROGRESS_TAG + json.dumps(RECORD), "epoch 1/3  loss 2.1  coarse 20%", "(pid) some Ray line"]


@pytest.fixture
def printed():
    """Ray's printer as `ray.init` installs it, recording what reaches the log; restored after."""
    before, seen = list(dispatcher.handlers), []
    dispatcher.handlers = [("ray_print_logs", lambda data: seen.extend(data["lines"]))]
    yield seen
    dispatcher.handlers = before


@pytest.mark.parametrize("keep", [False, True])
def test_progress_records_go_to_the_bar_and_stay_in_the_log_only_when_kept(printed, keep):
    lines, records = [], []
    assert forward_worker_lines(lines.append, records.append, keep_progress=keep)
    dispatcher.emit({"pid": 1, "lines": LINES})
    dispatcher.emit({"pid": 1, "lines": LINES[1:2]})  # Ray Train's print patch repeats a line: shown once
    assert records == [RECORD] and lines == [LINES[1]]
    assert printed == (LINES if keep else LINES[1:]) + [LINES[1]]
