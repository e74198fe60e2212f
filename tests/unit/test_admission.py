from manager.control.admission import AdmissionInput, decide, place

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
    d = decide(base(requested=36 * G, measured_free=79 * G))
    assert not d.admitted and d.failed_checks == ("ledger",)
    assert "36.0 GiB requested (+ 512.0 MiB per-process overhead) but only 36.0 GiB is unreserved" in d.messages[0]
    assert "headroom 4.0 GiB" in d.messages[0] and "reserved by others 40.0 GiB" in d.messages[0]


def test_ledger_exact_fit_is_admitted() -> None:
    # the reservation and its engine's CUDA context (outside vLLM's budget) fill the ledger exactly
    assert decide(base(requested=36 * G - 512 * M, measured_free=79 * G)).admitted
    assert not decide(base(requested=36 * G - 511 * M, measured_free=79 * G)).admitted


def test_ledger_counts_the_drivers_reservation_and_every_engines_context() -> None:
    # an A100 80GB: NVML total 81,920 MiB, of which the driver keeps 870 MiB; two tenants already on it
    d = decide(
        base(
            total=81920 * M,
            system_reserved=870 * M,
            headroom=G,
            reserved_by_others=40 * G,
            others=2,
            requested=38 * G,
            measured_free=79 * G,
        )
    )
    assert d.failed_checks == ("ledger",)
    assert "driver reserved 870.0 MiB" in d.messages[0] and "their 2 x 512.0 MiB per-process overhead" in d.messages[0]
    assert d.numbers["unreserved"] == 81920 * M - 870 * M - G - 40 * G - 2 * 512 * M
    assert d.numbers["system_reserved"] == 870 * M and d.numbers["others_overhead"] == G


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


def test_place_picks_the_tightest_device_that_fits() -> None:
    roomy = base(device="GPU 0 (GPU-a)", reserved_by_others=0, measured_free=79 * G)
    tight = base(device="GPU 1 (GPU-b)", reserved_by_others=60 * G, measured_free=19 * G)
    index, decision = place([roomy, tight])
    assert index == 1 and decision.admitted and decision.messages[0] == "on GPU 1 (GPU-b)"
    index, _ = place([roomy, base(device="GPU 1 (GPU-b)", reserved_by_others=70 * G, measured_free=9 * G)])
    assert index == 0


def test_place_refusal_names_every_device() -> None:
    full = base(device="GPU 0 (GPU-a)", reserved_by_others=76 * G, measured_free=3 * G)
    busy = base(device="GPU 1 (GPU-b)", reserved_by_others=0, measured_free=2 * G)
    index, decision = place([full, busy])
    assert index is None and not decision.admitted
    assert decision.failed_checks == ("ledger", "measured")
    assert decision.messages[0].startswith("GPU 0 (GPU-a): ledger:")
    assert decision.messages[1].startswith("GPU 1 (GPU-b): measured:")
