from manager.console.session import LoginLimiter, Sessions
from manager.console.views import capacity_segments, day_bars, label_of
from manager.control.capacity import DeviceCapacity, TenantUsage
from manager.gpu import DeviceMemory

G = 1024**3
M = 1024**2


def test_session_cookie_round_trip_and_tamper() -> None:
    sessions = Sessions("secret")
    cookie, session = sessions.issue("admin", now=1000.0)
    assert sessions.read(cookie, now=1001.0) == session
    assert sessions.read(cookie, now=1000.0 + 13 * 3600) is None  # expired
    raw, sig = cookie.rsplit(".", 1)
    assert sessions.read(raw + "." + "0" * len(sig), now=1001.0) is None
    assert Sessions("other").read(cookie, now=1001.0) is None
    assert sessions.read("garbage", now=1001.0) is None


def test_login_limiter() -> None:
    limiter = LoginLimiter(attempts=2, window_s=60)
    limiter.failed("a", now=0)
    assert limiter.blocked("a", now=1) == 0
    limiter.failed("a", now=1)
    assert limiter.blocked("a", now=2) == 58
    assert limiter.blocked("b", now=2) == 0
    assert limiter.blocked("a", now=61) == 0


def test_capacity_segments_add_up_to_the_device() -> None:
    device = DeviceMemory(0, "GPU-0", "A100", "gpu", 80 * G, 50 * G, 30 * G)
    cap = DeviceCapacity(device, 4 * G, 0, [TenantUsage("a", 10 * G, 5 * G), TenantUsage("b", 20 * G, None)])
    segs = capacity_segments(cap)
    assert [s.label for s in segs] == ["b", "a", "free", "headroom"]
    assert sum(s.percent for s in segs) == 100.0
    assert segs[1].measured_percent == 50.0 and segs[0].measured_percent == 0.0


def test_capacity_segments_show_the_drivers_memory_and_the_engines_contexts() -> None:
    device = DeviceMemory(0, "GPU-0", "A100", "gpu", 81920 * M, 50 * G, 30 * G, reserved=870 * M)
    cap = DeviceCapacity(device, G, 512 * M, [TenantUsage("a", 10 * G, None), TenantUsage("b", 20 * G, None)])
    segs = capacity_segments(cap)
    assert [s.label for s in segs] == ["b", "a", "contexts", "free", "headroom", "driver"]
    assert abs(sum(s.percent for s in segs) - 100.0) < 1e-9
    assert "unknown" in segs[0].title
    assert cap.unreserved == 81920 * M - 870 * M - G - 30 * G - 3 * 512 * M


def test_day_bars_scale_to_the_busiest_day() -> None:
    bars = day_bars([("2026-11-01", 10, 100), ("2026-11-03", 5, 400)], ["2026-11-01", "2026-11-02", "2026-11-03"])
    assert [(b["requests"], b["req_pct"], b["tok_pct"]) for b in bars] == [
        (10, 100.0, 25.0),
        (0, 0.0, 0.0),
        (5, 50.0, 100.0),
    ]


def test_an_audit_detail_reads_as_text() -> None:
    from manager.detail import detail_text

    detail = {
        "gpu_memory": 1536 * M,
        "port": 30001,
        "model": "demo",
        "quotas": {"rpm_limit": 9, "tokens_per_day": None},
    }
    detail |= {"tokens_per_day": 5_000_000, "failed_checks": ["ledger", "measured"], "error": "it's 'quoted'"}
    assert detail_text(detail) == (
        "gpu memory: 1.5 GiB; port: 30001; model: demo; quotas: rpm_limit 9; tokens per day: 5000000; "
        "failed checks: ledger, measured; error: it's 'quoted'"
    )


def test_a_label_is_drawn_only_where_it_fits() -> None:
    from manager.console.views import Segment

    assert Segment("headroom", "", 10.0, "#000", 0, "headroom").show_label
    assert not Segment("headroom", "", 3.0, "#000", 0, "headroom").show_label  # title and legend name it


def test_a_device_is_named_with_its_node_on_a_swarm() -> None:
    gpu = DeviceMemory(1, "GPU-1", "A100", "gpu", 80 * G, 80 * G, 0)
    host = DeviceMemory(0, "host-memory", "host memory", "host-memory", 24 * G, 20 * G, 4 * G)
    assert (label_of(gpu), label_of(host)) == ("GPU 1", "host memory")
    on_b = DeviceMemory(1, "GPU-1", "A100", "gpu", 80 * G, 80 * G, 0, node="n2id", node_name="gpu-b", node_index=0)
    assert label_of(on_b) == "GPU 1 on gpu-b"
    assert label_of(DeviceMemory(0, "host-memory@n1id", "host memory", "host-memory", G, G, 0, node="n1id")) == (
        "host memory on n1id"  # no host name reported: its node ID
    )
