import pytest

from manager.control.engine_logs import available_kv_cache, failure_reason
from manager.control.reconciler import backoff
from manager.domain import TenantStatus, can_transition
from manager.runtime.types import ContainerState

S = TenantStatus


@pytest.mark.parametrize(
    ("a", "b", "ok"),
    [
        (S.PENDING, S.STARTING, True),
        (S.STARTING, S.RUNNING, True),
        (S.RUNNING, S.FAILED, True),
        (S.FAILED, S.STARTING, True),
        (S.RUNNING, S.PENDING, True),
        (S.REMOVING, S.RUNNING, False),
        (S.PENDING, S.RUNNING, False),
        (S.RUNNING, S.RUNNING, True),
    ],
)
def test_transitions(a: TenantStatus, b: TenantStatus, ok: bool) -> None:
    assert can_transition(a, b) is ok


def exited(**over: object) -> ContainerState:
    base = dict(
        id="x",
        name="e",
        labels={},
        status="exited",
        health=None,
        exit_code=1,
        oom_killed=False,
        error="",
        started_at="",
        finished_at="t",
    )
    base.update(over)
    return ContainerState(**base)  # type: ignore[arg-type]


def test_vllm_free_memory_error_surfaces_as_such() -> None:
    logs = (
        "INFO loading\nValueError: Free memory on device cuda:0 (3.2/79.1 GiB) on startup is less than "
        "desired GPU memory utilization (0.5, 39.6 GiB).\nTraceback...\n"
    )
    assert failure_reason(exited(), logs).startswith("Free memory on device cuda:0 (3.2/79.1 GiB)")


def test_first_error_line_is_the_root_cause() -> None:
    logs = "x\nValueError: max_model_len (4096) is too large\nRuntimeError: raised while handling it\n"
    assert failure_reason(exited(), logs) == "ValueError: max_model_len (4096) is too large"


def test_a_warning_that_names_an_error_is_not_the_reason() -> None:
    logs = (
        "(APIServer pid=1) WARNING 11-23 11:35:47 [system_utils.py:255] Found ulimit of 20000 and failed to "
        "automatically increase with error current limit exceeds maximum limit. This can cause fd limit "
        "errors like `OSError: [Errno 24] Too many open files`. Consider increasing with ulimit -n\n"
        "(EngineCore_DP0 pid=50) ERROR 11-23 11:35:59 [core.py:708] KeyError: 'model.layers.0.weight'\n"
    )
    assert failure_reason(exited(), logs) == "KeyError: 'model.layers.0.weight'"


def test_vllm_engine_core_wrapper_line_is_never_the_reason() -> None:
    """vLLM's API server ends with a generic line; the engine core printed the cause above it."""
    logs = (
        "(EngineCore_DP0 pid=77) ERROR 11-23 11:30:01 [core.py:708] EngineCore failed to start.\n"
        "(EngineCore_DP0 pid=77) ERROR 11-23 11:30:01 [core.py:708] Traceback (most recent call last):\n"
        "(EngineCore_DP0 pid=77) ERROR 11-23 11:30:01 [core.py:708] OSError: [Errno 28] No space left on "
        "device: '/tmp/torch'\n"
        "Traceback (most recent call last):\n"
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}\n"
    )
    assert failure_reason(exited(), logs) == "OSError: [Errno 28] No space left on device: '/tmp/torch'"


def test_pydantic_validation_detail_is_kept() -> None:
    logs = (
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
        "  Value error, User-specified max_model_len (4096) is greater than the derived max_model_len "
        "[type=value_error, input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]\n"
    )
    reason = failure_reason(exited(), logs)
    assert reason == (
        "ValidationError: 1 validation error for ModelConfig: Value error, User-specified "
        "max_model_len (4096) is greater than the derived max_model_len"
    )


def test_oom_kill_says_what_to_do() -> None:
    assert "raise --gpu-memory" in failure_reason(exited(oom_killed=True, exit_code=137), "")


def test_exit_code_as_last_resort() -> None:
    assert failure_reason(exited(exit_code=3), "nothing useful") == "engine exited with code 3"


def test_backoff_doubles_to_a_cap() -> None:
    assert [backoff(n, 10, 300) for n in (1, 2, 3, 6, 10)] == [10, 20, 40, 300, 300]


def test_every_spelling_of_the_quotas_is_the_declarations(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``Quotas`` and ``QUOTA_KINDS`` declare the quotas; the gateway's contract and the API's
    typed schemas name them again (their types are checked statically), so they must agree, and
    the CLI and the database take them from the declaration."""
    import sqlite3

    from manager import cli
    from manager.api import schemas
    from manager.contract import Limits
    from manager.control.sqlite_store import SqliteStore
    from manager.domain import QUOTA_FIELDS, QUOTA_KINDS, Quotas

    assert tuple(QUOTA_KINDS) == QUOTA_FIELDS == tuple(Quotas.__dataclass_fields__)
    assert Limits is Quotas  # the gateway's contract carries the declaration itself
    assert tuple(schemas.MemberUpdate.model_fields) == (*QUOTA_FIELDS, "weight")  # the quotas, and the fair share
    assert set(QUOTA_FIELDS) <= set(schemas.TenantCreate.model_fields)
    for name, kind in QUOTA_KINDS.items():
        field = schemas.MemberUpdate.model_fields[name]
        assert kind.meaning in (field.description or "")
    options = {a.dest for a in cli.build_parser()._subparsers._group_actions[0].choices["add-member"]._actions}
    assert set(QUOTA_FIELDS) <= options
    SqliteStore(tmp_path / "m.db").close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        for table in ("tenants", "members"):
            columns = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            assert set(QUOTA_FIELDS) <= columns, table


def test_an_oom_kill_names_the_memory_that_ran_out() -> None:
    """cpu: the reservation is the engine's memory limit; nvml: the reservation is device memory,
    so an OOM kill is the host's RAM, which --gpu-memory does not change."""
    killed = exited(exit_code=137, oom_killed=True)
    assert "raise --gpu-memory" in failure_reason(killed, "")
    on_gpu = failure_reason(killed, "", reservation_is_host_memory=False)
    assert "it ran out of host RAM, not GPU memory" in on_gpu and "--gpu-memory does not change it" in on_gpu


def test_a_gpu_engines_kv_cache_is_read_from_its_start_up_log_never_high() -> None:
    """vLLM 0.32's gpu_worker line, GiB to two decimals: the least it can stand for; the last one
    counts (a restarted process logs again); none on the CPU backend."""
    logs = (
        "INFO 12-06 10:00:00 [gpu_worker.py:760] Available KV cache memory: 9.5 GiB\n"
        "INFO 12-06 10:00:09 [gpu_worker.py:760] Available KV cache memory: 12.34 GiB\n"
        "INFO 12-06 10:00:10 [api_server.py:1] Starting vLLM API server 0 on http://0.0.0.0:8000\n"
    )
    assert available_kv_cache(logs) == int(12.335 * 1024**3)
    assert available_kv_cache("INFO [cpu_worker.py:1] init engine (profile, create kv cache) took 1.2 s") is None
