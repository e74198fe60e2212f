"""A console action never holds the event loop: with a runtime as slow as Docker 20.10's stats
read (about a second), /healthz (and with it the whole admin API) answers while a console form is
being served."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from manager.runtime.memory import MemoryRuntime
from manager.runtime.types import ContainerState
from manager.settings import Settings
from manager.wiring import create_app

from .conftest import TOKEN, write_demo_model
from .test_console_forms import _form_of, _signed_in

SLOW_S = 1.0


class SlowRuntime(MemoryRuntime):
    """The in-memory runtime, whose container listing takes ``SLOW_S`` once ``slow`` is set."""

    slow = False

    def containers(self, selector: list[str]) -> list[ContainerState]:
        if self.slow:
            time.sleep(SLOW_S)
        return super().containers(selector)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[tuple[str, SlowRuntime]]:
    write_demo_model(tmp_path / "models")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    runtime = SlowRuntime()
    config = Settings(
        gpu_mode="cpu",
        instance="gtmslow",
        state_dir=tmp_path / "state",
        models_dir=tmp_path / "models",
        api_host="127.0.0.1",
        api_port=port,
        admin_token=TOKEN,
        reconcile_interval_s=3600,
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(config, runtime=runtime), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", runtime
    runtime.slow = False
    server.should_exit = True
    thread.join(10)


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
    assert max(waits) < 0.3, f"/healthz waited {max(waits):.2f} s behind a console form"
