from manager.control.admission import AdmissionInput, decide

G = 1024**3
M = 1024**2


def base(**over: int | None) -> AdmissionInput:
    values: dict[str, int | None] = dict(
        requested=10 * G,
        total=80 * G,
        headroom=4 * G,
        reserved_by_others=40 * G,
        measured_free=39 * G,
        measured_used=41 * G,
        not_yet_taken_by_others=0,
        reclaimable=0,
        process_overhead=512 * M,
        model_minimum=6 * G,
    )
    values.update(over)
    return AdmissionInput(**values)  # type: ignore[arg-type]


def test_admits_when_every_check_holds() -> None:
    d = decide(base())
    assert d.admitted and d.failed_checks == ()
    assert d.numbers["unreserved"] == 36 * G


def test_ledger_refusal_names_the_numbers() -> None:
    d = decide(base(requested=37 * G, measured_free=79 * G))
    assert not d.admitted and d.failed_checks == ("ledger",)
    assert "37.0 GiB requested but only 36.0 GiB is unreserved" in d.messages[0]
    assert "headroom 4.0 GiB" in d.messages[0] and "reserved by others 40.0 GiB" in d.messages[0]


def test_ledger_exact_fit_is_admitted() -> None:
    assert decide(base(requested=36 * G, measured_free=79 * G)).admitted


def test_measured_refusal_when_foreign_processes_hold_memory() -> None:
    # the ledger has room but something we did not start uses the GPU
    d = decide(base(measured_free=10 * G))
    assert d.failed_checks == ("measured",)
    assert "10.5 GiB needed" in d.messages[0]


def test_measured_counts_reservations_not_yet_taken() -> None:
    d = decide(base(measured_free=20 * G, not_yet_taken_by_others=12 * G))
    assert d.failed_checks == ("measured",)
    assert "12.0 GiB of it still promised" in d.messages[0]


def test_resize_may_use_what_its_own_engine_frees() -> None:
    d = decide(base(measured_free=6 * G, reclaimable=8 * G))
    assert d.admitted


def test_model_fit_refusal() -> None:
    d = decide(base(requested=4 * G))
    assert d.failed_checks == ("model_fit",)
    assert "at least 6.0 GiB" in d.messages[0]


def test_every_failed_check_is_reported() -> None:
    d = decide(base(requested=50 * G, measured_free=1 * G, model_minimum=60 * G))
    assert d.failed_checks == ("ledger", "measured", "model_fit")
    assert len(d.messages) == 3
    assert d.summary.startswith("refused: ledger:")
