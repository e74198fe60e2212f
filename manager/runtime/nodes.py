"""The node agents' reports, as the manager reads them: every agent asked at once over the control
overlay, at most once per ``max_age_s`` (the measured figures of one reconcile round come from one
reading). An agent that does not answer leaves its node out of the answer, and says why in the log
once; its figures are unknown then, never the last ones seen."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from pydantic import ValidationError

from manager.node_report import REPORT_PATH, VOLUMES_PATH, NodeReport

log = logging.getLogger(__name__)
TIMEOUT_S = 3.0


class AgentReader:
    """``reader()``: the reports of every agent ``addresses()`` names (node ID -> address), by node ID."""

    def __init__(
        self,
        addresses: Callable[[], dict[str, str]],
        token: str,
        port: int,
        max_age_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._addresses, self._port, self._max_age_s, self._clock = addresses, port, max_age_s, clock
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT_S, transport=transport
        )
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="agent-read")  # up to 8 nodes asked at once
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._reports: dict[str, NodeReport] = {}
        self._failing: dict[str, str] = {}

    def __call__(self) -> dict[str, NodeReport]:
        with self._lock:
            if self._read_at is None or self._clock() - self._read_at >= self._max_age_s:
                # aged from the read's end: a silent agent holds a read for TIMEOUT_S, and a cache
                # aged from its start would be stale at once, every caller waiting out the timeout
                self._reports = self._read_all()
                self._read_at = self._clock()
            return dict(self._reports)

    def _read_all(self) -> dict[str, NodeReport]:
        addresses = self._addresses()
        if not addresses:
            return {}
        answers = dict(zip(addresses, self._pool.map(self._read, addresses.values()), strict=True))
        out: dict[str, NodeReport] = {}
        for node, answer in answers.items():
            if isinstance(answer, NodeReport):
                out[node] = answer
                if self._failing.pop(node, None) is not None:
                    log.info("the agent of node %s answers again", node)
            elif self._failing.get(node) != answer:
                self._failing[node] = answer
                log.warning("the agent of node %s at %s did not report: %s", node, addresses[node], answer)
        return out

    def _read(self, address: str) -> NodeReport | str:
        """The report at ``address``, or why there is none."""
        try:
            r = self._client.get(f"http://{address}:{self._port}{REPORT_PATH}")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {r.text[:200]}"
        try:
            return NodeReport.model_validate_json(r.content)
        except ValidationError as exc:
            return f"an unreadable report: {exc.error_count()} errors"

    def remove_volume(self, node: str, name: str) -> str | None:
        """Asks ``node``'s agent to remove volume ``name`` there (``VOLUMES_PATH``); None when it
        is gone, else why it stays."""
        address = self._addresses().get(node)
        if address is None:
            return f"no agent of node {node} runs"
        try:
            r = self._client.delete(f"http://{address}:{self._port}{VOLUMES_PATH}{name}")
        except httpx.HTTPError as exc:
            return f"the agent of node {node} did not answer: {type(exc).__name__}: {exc}"
        if r.status_code == 200:
            return None
        try:
            return str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            return f"HTTP {r.status_code}: {r.text[:200]}"

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()
