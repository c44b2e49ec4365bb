"""One model version per request: a mismatch is refused, the request answered again whole, never mixed."""
import asyncio

import pytest
import torch
from ray.exceptions import RayTaskError

from serve import versions
from serve.inputs import APIError
from serve.messages import StageAnswer, VersionMismatch
from serve.versions import answered_by_one_version, version_mismatch


def _answer(version: str, stage: str = "coarse", exited: bool = True) -> StageAnswer:
    return StageAnswer(stage=stage, probs=torch.tensor([0.2, 0.8]), exited=exited, version=version)


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch):
    monkeypatch.setattr(versions, "VERSION_PAUSE_S", 0.0)


def test_a_coarse_answer_is_never_finished_by_another_versions_fine_answer():
    coarse = _answer("1", exited=False)
    assert coarse.finished_by(_answer("1", "fine")).version == "1"
    with pytest.raises(VersionMismatch, match="coarse answer of model version '1' met a fine answer of version '2'"):
        coarse.finished_by(_answer("2", "fine"))


def test_a_refusal_from_a_replica_is_recognised_through_rays_wrapper():
    wrapped = RayTaskError("FineStage.run", "Traceback ...", VersionMismatch("refused")).as_instanceof_cause()
    assert version_mismatch(wrapped) and version_mismatch(VersionMismatch("x"))
    assert not version_mismatch(RayTaskError("f", "tb", ValueError("bug")).as_instanceof_cause())


def test_refused_or_mixed_attempts_are_answered_again_whole():
    outcomes = [VersionMismatch("fine of 2 refuses coarse of 1"), [_answer("1"), _answer("2")], [_answer("2")] * 2]
    calls = []

    async def attempt():
        calls.append(1)
        out = outcomes[len(calls) - 1]
        if isinstance(out, Exception):
            raise out
        return out

    answers = asyncio.run(answered_by_one_version(attempt))
    assert len(calls) == 3 and {a.version for a in answers} == {"2"}


def test_no_single_version_in_time_is_a_503_never_a_mixed_answer():
    async def mixed():
        return [_answer("1"), _answer("2")]

    with pytest.raises(APIError) as e:
        asyncio.run(answered_by_one_version(mixed, wait_s=0.05))
    assert e.value.status == 503 and e.value.detail["attempts"] >= 2 and e.value.detail["waited_s"] == 0.05
    assert set(e.value.detail["seen"]) == {"1+2"}


def test_other_failures_are_not_retried():
    calls = []

    async def broken():
        calls.append(1)
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(answered_by_one_version(broken))
    assert len(calls) == 1
