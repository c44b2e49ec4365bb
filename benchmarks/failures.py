"""What the load benchmarks (`cfvit bench serve`, `--burst`) say about failed requests: the first distinct
statuses and error bodies a system answered, so a table of errors is never the only clue."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

MAX_DISTINCT = 5  # distinct (status, body) pairs kept per system
BODY_CHARS = 300


class ErrorLog:
    """Counts failed requests by (status, body); keeps the first `MAX_DISTINCT` distinct ones."""

    def __init__(self) -> None:
        self._seen: Dict[tuple, Dict[str, Any]] = {}
        self.total = 0

    def add(self, status: int, body: str) -> None:
        """One failed request: its HTTP status (0: no answer, `body` then names the client's error)."""
        self.total += 1
        key = (int(status), body.strip()[:BODY_CHARS])
        if key in self._seen:
            self._seen[key]["count"] += 1
        elif len(self._seen) < MAX_DISTINCT:
            self._seen[key] = {"status": key[0], "body": key[1], "count": 1}

    def samples(self) -> List[Dict[str, Any]]:
        return list(self._seen.values())


def describe(name: str, samples: List[Dict[str, Any]], failed: int, sent: Optional[int] = None) -> List[str]:
    """Lines naming a system's failures: how many, then each distinct status and body."""
    if not failed:
        return []
    of = f" of {sent}" if sent is not None else ""
    lines = [f"{name}: {failed}{of} request(s) failed; first distinct answers:"]
    for s in samples:
        status = f"HTTP {s['status']}" if s["status"] else "no answer"
        lines.append(f"  {s['count']}× {status}: {s['body'] or '(empty body)'}")
    return lines
