"""Reading an engine's logs: why it stopped, in its own words. Pure: the reconciler hands it the
container's state and the tail of its logs."""

from __future__ import annotations

import re

from manager.runtime.types import ContainerState

COLD_CACHE = re.compile(r"Available memory on node .* on kv cache allocation is less than", re.IGNORECASE)
"""vLLM's CPU backend refusing its KV cache because the page cache it just read counts as used."""
AVAILABLE_KV_CACHE = re.compile(r"Available KV cache memory: (\d+(?:\.\d+)?) GiB")
"""vLLM's GPU worker after its profile run (v1/worker/gpu_worker.py ``determine_available_memory``,
0.32): what its budget left for the KV cache, in GiB to two decimals."""
START_LOG_LINES = 3000
"""How much of a new engine's log is read for that line: its whole start-up."""
LOG_TAIL_LINES = 400
LOG_KEEP_CHARS = 32_000
FAILURE_PATTERNS = [
    re.compile(r"Free memory on device.*", re.IGNORECASE),
    re.compile(r"(?:CUDA )?out of memory.*", re.IGNORECASE),
    re.compile(r"\b\w*(?:Error|Exception): .*"),
]
WRAPPER_LINES = re.compile(
    r"Engine core initialization failed|See root cause above|EngineCore failed to start", re.IGNORECASE
)
"""Lines that only point at an error printed earlier: never the reason."""
NOT_AN_ERROR = re.compile(r"\b(?:DEBUG|INFO|WARNING)\b \d\d-\d\d \d\d:\d\d:\d\d|Warning: ")
"""vLLM's own log lines below ERROR, and Python warnings: they may quote an error's name
("... can cause fd limit errors like `OSError: ...`") without anything having failed."""


def available_kv_cache(logs: str) -> int | None:
    """The KV cache bytes a GPU engine's profile left, from its start-up log (None: not logged,
    as on vLLM's CPU backend, which is given its KV cache): the least the figure, rounded to 0.01
    GiB, can stand for, so that an overhead derived from it is never low."""
    found = AVAILABLE_KV_CACHE.findall(logs)
    return max(int((float(found[-1]) - 0.005) * 1024**3), 0) if found else None


def failure_reason(state: ContainerState, logs: str, reservation_is_host_memory: bool = True) -> str:
    """The engine's own words for why it stopped: the *first* error it printed (the root
    cause; vLLM ends with a generic "Engine core initialization failed" line), or the
    best description Docker gives. ``reservation_is_host_memory``: an OOM kill is the
    reservation's (cpu), else the host's RAM (nvml: the reservation is device memory)."""
    if state.oom_killed and reservation_is_host_memory:
        return (
            "engine killed by the out-of-memory killer: the reservation is too small for this "
            "model and options; raise --gpu-memory or lower --max-model-len"
        )
    if state.oom_killed:
        return (
            "engine killed by the out-of-memory killer: it ran out of host RAM, not GPU memory (its "
            "limit is GTM_ENGINE_HOST_MEMORY plus its weights' size, which a sleeper keeps pinned); "
            "--gpu-memory does not change it: raise GTM_ENGINE_HOST_MEMORY, or free host memory"
        )
    lines = [
        ln.strip()
        for ln in logs.splitlines()
        if ln.strip() and not WRAPPER_LINES.search(ln) and not NOT_AN_ERROR.search(ln)
    ]
    for pattern in FAILURE_PATTERNS:
        for i, line in enumerate(lines):
            found = pattern.search(line)
            if found:
                text = found.group(0)
                if "validation error" in text and i + 1 < len(lines):  # pydantic: the detail is below
                    text += ": " + lines[i + 1].split(" [type=")[0]
                return text[:500]
    if state.error:
        return f"Docker could not run the engine: {state.error}"[:500]
    if state.exit_code == 137:
        return "engine was killed (SIGKILL, exit code 137) without an error of its own"
    return f"engine exited with code {state.exit_code}"
