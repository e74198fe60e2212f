"""The NVML inventory and admission against a real NVIDIA GPU (skipped without one)."""

from __future__ import annotations

import os

import pytest

from manager.control.admission import AdmissionInput, decide
from manager.gpu.nvml import NvmlInventory

pytestmark = pytest.mark.gpu


def test_devices_report_consistent_memory() -> None:
    inv = NvmlInventory.open()
    try:
        devices = inv.devices()
        assert devices
        for d in devices:
            assert d.total > 0 and d.uuid.startswith(("GPU-", "MIG-"))
            assert 0 <= d.free <= d.total and 0 <= d.used <= d.total
    finally:
        inv.close()


def test_own_allocation_is_measured_per_process_and_refuses_what_no_longer_fits() -> None:
    torch = pytest.importorskip("torch")
    inv = NvmlInventory.open()
    try:
        before = inv.devices()[0]
        block = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        after = inv.devices()[0]
        assert before.free - after.free >= 2 * 1024**3 - 64 * 1024**2
        mine = [p for p in inv.processes() if p.pid == os.getpid()]
        assert mine and mine[0].used >= 2 * 1024**3
        # a request for everything that was free before no longer fits the measured check
        decision = decide(
            AdmissionInput(
                requested=before.free - 256 * 1024**2,
                total=after.total,
                headroom=0,
                reserved_by_others=0,
                measured_free=after.free,
                measured_used=after.used,
                not_yet_taken_by_others=0,
                reclaimable=0,
                process_overhead=512 * 1024**2,
            )
        )
        assert decision.failed_checks == ("measured",)
        del block
    finally:
        inv.close()
