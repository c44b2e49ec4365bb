"""`cfvit submit` against a cluster that has just started: its job agent is not registered yet."""
import pytest

from jobs.ops import submit


class Client:
    """Answers the first `busy` submissions as Ray's dashboard does before its job agent is up."""

    def __init__(self, busy: int, error: str = "No available agent to submit job, please try again later."):
        self.busy, self.error, self.calls = busy, error, 0

    def submit_job(self, **kw):
        self.calls += 1
        if self.calls <= self.busy:
            raise RuntimeError(f"Request failed with status code 500: {self.error}")
        return kw["submission_id"] or "raysubmit_1"

    def get_address(self):
        return "http://127.0.0.1:8265"


def test_a_cluster_without_its_job_agent_yet_is_asked_again(monkeypatch):
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    client = Client(busy=3)
    assert submit.submit(client, ["python", "-c", "pass"], {}, "job-1") == "job-1"
    assert client.calls == 4


def test_other_errors_and_a_long_wait_are_not_retried(monkeypatch):
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    client = Client(busy=5, error="bad runtime env")
    with pytest.raises(submit.SubmitError, match="bad runtime env"):
        submit.submit(client, ["python"], {}, None)
    assert client.calls == 1
    monkeypatch.setattr(submit, "AGENT_WAIT_S", -1.0)  # the agent never comes: give up with Ray's message
    client = Client(busy=100)
    with pytest.raises(submit.SubmitError, match="No available agent"):
        submit.submit(client, ["python"], {}, None)
    assert client.calls == 1
