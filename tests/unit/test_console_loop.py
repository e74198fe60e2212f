"""A console action never holds the event loop: with a runtime as slow as Docker 20.10's stats
read (about a second), /healthz (and with it the whole admin API) answers while a console form is
being served."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from manager.runtime.memory import MemoryRuntime
from manager.runtime.types import ContainerState

from .conftest import manager_serving
from .test_console_forms import _form_of, _signed_in

SLOW_S = 2.0


class SlowRuntime(MemoryRuntime):
    """The in-memory runtime, whose container listing takes ``SLOW_S`` once ``slow`` is set."""

    slow = False

    def containers(self, selector: list[str]) -> list[ContainerState]:
        if self.slow:
            time.sleep(SLOW_S)
        return super().containers(selector)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[str, SlowRuntime]]:
    runtime = SlowRuntime()
    with manager_serving(tmp_path, "gtmslow", runtime) as url:
        yield url, runtime
        runtime.slow = False


def test_healthz_answers_while_a_console_form_waits_on_the_runtime(slow: tuple[str, SlowRuntime]) -> None:
    base_url, runtime = slow
    console = _signed_in(base_url)
    form = _form_of(console.get("/tenants/new").text, "/tenants/new")
    form.update(name="slowlab", gpu_memory="1536M", port="30991")
    runtime.slow = True
    posted: list[float] = []

    def add() -> None:
        started = time.monotonic()
        answer = console.post("/tenants/new", data=form, timeout=30)
        posted.append(time.monotonic() - started)
        assert answer.status_code == 200, answer.text

    adding = threading.Thread(target=add)
    adding.start()
    time.sleep(0.2)  # the form is being served: admission is reading the runtime
    waits = []
    for _ in range(5):
        started = time.monotonic()
        assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
        waits.append(time.monotonic() - started)
    adding.join(30)
    console.close()
    assert posted and posted[0] >= SLOW_S, "the form did wait on the slow runtime"
    # blocked, it would wait out the runtime's read (SLOW_S); served, it answers in milliseconds
    assert max(waits) < SLOW_S / 2, f"/healthz waited {max(waits):.2f} s behind a console form"
