"""What travels between the ingress and the model stages (across Ray processes): one shape for every topology.

A stage answers each image with a `StageAnswer`. The ingress reads the same fields whatever served it —
`split`, `fused` or `backbone` — so no topology can leave out a field another one relies on.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Literal, Optional

import torch

from cfvit.model import CoarseState

Stage = Literal["coarse", "fine", "backbone"]


@dataclass
class Handoff:
    """What the fine stage needs for one image: its pixels and the coarse pass's state."""

    image: torch.Tensor
    state: CoarseState
    version: str = ""  # the model version of the coarse stage that made `state`


class VersionMismatch(RuntimeError):
    """A stage was handed the work of another model version (mid-rollout): the fine stage refuses a coarse
    state made by another version, and a coarse answer is never completed by another version's fine answer.
    The ingress answers the request again, whole (serve/versions.py)."""


@dataclass
class BatchTiming:
    """One batch of a stage: when its compute started (epoch seconds), how long it took (ms), its size."""

    started: float
    compute_ms: float
    size: int


@dataclass
class StageAnswer:
    """One image's answer from a model stage.

    `stage` names whose probabilities `probs` are. A coarse answer with `exited=False` is not final: the
    image is over its η budget and `handoff` (a `Handoff`, or an object reference to one) goes on to the
    fine stage. A coarse answer that exited may still carry a `handoff` when the drift monitor shadows it.
    """

    stage: Stage
    probs: torch.Tensor
    exited: bool = True
    coarse_probs: Optional[torch.Tensor] = None  # the coarse pass's probabilities (None for the backbone)
    selected: Optional[List[int]] = None  # fine answers: the coarse-grid indices that were re-split
    handoff: Any = None
    timing: Dict[str, float] = field(default_factory=dict)  # ms per hop, for the Server-Timing header
    done_at: float = 0.0  # epoch seconds when the answer left its replica
    version: str = ""  # the model version of the replica that answered

    def take_handoff(self) -> Any:
        """The handoff, cleared here (it is sent on once, never returned to the client)."""
        handoff, self.handoff = self.handoff, None
        return handoff

    def finished_by(self, fine: "StageAnswer") -> "StageAnswer":
        """This coarse answer completed by the fine stage's answer for the same image (of the same version)."""
        if fine.version != self.version:
            raise VersionMismatch(f"a coarse answer of model version {self.version!r} met a fine answer of "
                                  f"version {fine.version!r}")
        return replace(fine, coarse_probs=self.probs, exited=True, timing={**self.timing, **fine.timing},
                       done_at=fine.done_at)
