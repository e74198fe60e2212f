"""What a gateway knows: the keys and limits the manager pushed, its quota state,
its store and its metrics. Shared by the public proxy and the admin app."""

from __future__ import annotations

import asyncio
import bisect
import hmac
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from manager.contract import GatewayConfig
from manager.gateway.fairq import FairQueue
from manager.gateway.hold import Hold
from manager.gateway.quotas import WINDOW_S, QuotaState
from manager.gateway.store import Begin, Drop, GatewayStore, Progress, Settle, Totals, Write
from manager.keys import hash_key, key_id
from manager.utc import start_of_day, start_of_month

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyEntry:
    id: str
    hash: str
    expires_at: float | None
    member: str = ""
    """The member holding the key ('' for a key pushed before members: only the tenant's limits)."""


class Tally:
    """A labelled Prometheus counter kept as plain numbers: the gateway's event loop is its only
    writer, so a count is a dict update (prometheus_client's counters take a lock and build a key
    each time: several a request). Exported at each scrape."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        self.name, self.documentation, self.labels = name, documentation, list(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def add(self, *labels: str, by: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + by

    def value(self, *labels: str) -> float:
        return self.values.get(labels, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, value in list(self.values.items()):  # one C-level copy: the loop may add meanwhile
            family.add_metric(list(labels), value)
        yield family


class Durations:
    """A Prometheus histogram kept as plain numbers, like ``Tally``; one per label set."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        self.name, self.documentation, self.bounds = name, documentation, list(buckets)
        self.labels = list(labels)
        self.series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        """labels -> (counts per bucket, the last above every bound; [sum])."""

    def observe(self, seconds: float, *labels: str) -> None:
        series = self.series.get(labels)
        if series is None:
            series = self.series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        series[0][bisect.bisect_left(self.bounds, seconds)] += 1
        series[1][0] += seconds

    def count(self, *labels: str) -> int:
        series = self.series.get(labels)
        return sum(series[0]) if series else 0

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, (counts, total) in list(self.series.items()):  # one C-level copy, as in ``Tally``
            cumulative, buckets = 0, []
            for bound, n in zip([*map(str, self.bounds), "+Inf"], list(counts), strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(list(labels), buckets, total[0])
        yield family


SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.requests = Tally("gtm_gateway_requests", "Requests by path and status", ["path", "status"])
        self.tokens = Tally("gtm_gateway_tokens", "Tokens metered", ["kind"])
        self.limited = Tally("gtm_gateway_rate_limited", "429s by reason and scope", ["reason", "scope"])
        # members are created by admins, so these label sets stay bounded
        self.member_requests = Tally(
            "gtm_gateway_member_requests", "Requests by member and status", ["member", "status"]
        )
        self.member_tokens = Tally("gtm_gateway_member_tokens", "Tokens metered by member", ["member", "kind"])
        self.images_refused = Tally(
            "gtm_gateway_images_refused", "Requests refused at the door for their images, by reason", ["code"]
        )
        self.upstream_errors = Tally("gtm_gateway_upstream_errors", "Engine unreachable or failing")
        self.refused = Tally(
            "gtm_gateway_refused",
            "Requests the gateway answered itself, never served by the engine and never metered, by error code",
            ["code"],
        )
        self.spool_errors = Tally(
            "gtm_gateway_spool_errors",
            "Usage records the spool could not take at once (kept in memory and written first once it can)",
        )
        self.latency = Durations("gtm_gateway_request_seconds", "Request latency through the gateway", SECONDS)
        self.queued = Durations(
            "gtm_gateway_queue_seconds",
            "Time a request waited at the gateway for one of the engine's slots (fair queuing), by member",
            SECONDS,
            ["member"],
        )
        self.first_token = Durations(
            "gtm_gateway_time_to_first_token_seconds",
            "Streamed requests: from arrival at the gateway (its queue included) to the first generated token, "
            "by member",
            SECONDS,
            ["member"],
        )
        self.per_token = Durations(
            "gtm_gateway_time_per_output_token_seconds",
            "Streamed requests: time per generated token after the first, by member",
            PER_TOKEN_SECONDS,
            ["member"],
        )
        for metric in (
            self.requests,
            self.tokens,
            self.limited,
            self.member_requests,
            self.member_tokens,
            self.images_refused,
            self.upstream_errors,
            self.refused,
            self.spool_errors,
            self.latency,
            self.queued,
            self.first_token,
            self.per_token,
        ):
            self.registry.register(metric)


class GatewayState:
    """The tenant's quota state and one per member; a request is admitted against both."""

    def __init__(self, store: GatewayStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self.keys: dict[str, KeyEntry] = {}
        self.version = ""
        self.quotas = QuotaState(clock=clock, scope="tenant", who="this tenant")
        self.members: dict[str, QuotaState] = {}
        self.metrics = GatewayMetrics()
        self.max_model_len: int | None = None
        """The engine's context length: no request uses more tokens (prompt plus completion)."""
        self.max_body: int | None = None
        """The tenant's request body limit (bytes); the gateway's setting when the manager sent none."""
        self.max_images: int | None = None
        self.max_image_pixels: int | None = None
        """The tenant's image limits; the gateway's settings when the manager sent none."""
        self.unwritten: list[Settle] = []
        """Records the spool could not take (its volume full): written first, in order, once it can."""
        self.spool_error: str | None = None
        self.hold = Hold()
        """Requests waiting while the tenant sleeps or wakes (the config's ``hold``)."""
        self.fair_queue = FairQueue()
        """Requests waiting for one of the engine's slots, per member (the config's ``concurrency``)."""
        self.last_request_at: float | None = None
        """When a request with a valid key last arrived (the manager's sleeper reads it); at start,
        when the spool's newest record was written: a gateway Docker restarted after a crash does
        not make its tenant look idle since before its last request."""
        self._pending: list[tuple[Write, asyncio.Future[bool]]] = []
        """This event-loop turn's writes, committed together at the start of the next."""
        saved = store.config()
        if saved:
            self.apply(saved, persist=False)
        interrupted = store.settle_interrupted(clock())  # before the totals: quotas count them too
        if interrupted:
            log.warning("%d requests were in flight when the gateway stopped: metered as interrupted", interrupted)
        self.last_request_at = store.last_record_at()
        self._load_totals()

    def _spooled(self, keys: dict[str, KeyEntry]) -> dict[str, list[Totals]]:
        """Per member, what each of its keys used (tokens today, requests this month, times in the rate
        window), from the spool; a record from before members counts for its key's member."""
        now = self.clock()
        per: dict[str, list[Totals]] = {}
        for t in self.store.totals_by_key(start_of_day(now), start_of_month(now), now - WINDOW_S):
            key = keys.get(t.key_id)
            per.setdefault(t.member or (key.member if key else ""), []).append(t)
        return per

    @staticmethod
    def _load(state: QuotaState, totals: list[Totals]) -> None:
        state.load(
            day_tokens=sum(t.day_tokens for t in totals),
            month_requests=sum(t.month_requests for t in totals),
            recent=[at for t in totals for at in t.recent],
        )

    def _load_totals(self) -> None:
        """Rebuilds every counter from the spool (at start)."""
        per = self._spooled(self.keys)
        self._load(self.quotas, [t for totals in per.values() for t in totals])
        for name, state in self.members.items():
            self._load(state, per.get(name, []))

    def apply(self, config: GatewayConfig, persist: bool = True) -> None:
        """Install a config pushed by the manager; keys and limits change without a restart, and a
        member's counters carry over (a removed member's go with its keys). Runs on the admin app's
        thread: everything new is built first and then published by plain assignments, so a request
        decided meanwhile sees either the old config or the new one."""
        if persist:
            self.store.save_config(config)
        keys = {k.id: KeyEntry(k.id, k.hash, k.expires_at, k.member) for k in config.keys}
        members: dict[str, QuotaState] = {}
        new: list[str] = []
        for m in config.members:
            state = self.members.get(m.name)
            if state is None:
                state = QuotaState(clock=self.clock, scope="member", who=f"member {m.name}")
                new.append(m.name)
            state.limits = m.limits
            members[m.name] = state
        if new and persist:  # a member added (or added again) while the gateway runs: today's use counts
            per = self._spooled(keys)
            for name in new:
                self._load(members[name], per.get(name, []))
        self.quotas.limits = config.limits
        self.max_model_len = config.max_model_len if config.max_model_len and config.max_model_len > 0 else None
        self.max_body = config.max_body if config.max_body and config.max_body > 0 else None
        self.max_images = config.max_images if config.max_images is not None and config.max_images >= 0 else None
        self.max_image_pixels = config.max_image_pixels if config.max_image_pixels else None
        self.members = members
        self.keys = keys
        self.version = config.version
        self.fair_queue.configure(
            config.concurrency if config.fair_queue else None, {m.name: m.weight for m in config.members}
        )
        # last: released ones see the rest
        self.hold.set(config.hold, config.hold_timeout_s, config.max_waiting, config.hold_refusal)

    def quota_states(self, key: KeyEntry) -> list[QuotaState] | None:
        """The limits a request with this key must pass: its member's (when it has one), then the
        tenant's. None when the key's member is gone (removed since the key was authenticated): the
        key is no longer valid, rather than bounded by the tenant's limits alone."""
        if not key.member:
            return [self.quotas]  # a key pushed before members
        member = self.members.get(key.member)
        return [member, self.quotas] if member is not None else None

    # ------------------------------------------------------------ the spool, written in groups
    def begin(self, fields: dict[str, object]) -> asyncio.Future[bool]:
        """A request admitted; the future says True once that is durable, False when the spool
        cannot take it (the request must then not be served)."""
        return self._write(Begin(fields))

    def progress(
        self, request_id: str, prompt_tokens: int, completion_tokens: int, status: int
    ) -> asyncio.Future[bool]:
        """What a request in flight has used so far (best effort: its record settles it anyway)."""
        return self._write(Progress(request_id, prompt_tokens, completion_tokens, status))

    def drop(self, request_id: str) -> None:
        self._write(Drop(request_id))

    def record(self, fields: Mapping[str, object], opened: bool = True) -> asyncio.Future[bool]:
        """A usage record (``UsageRecord``'s fields by name); the future says True once it is
        committed. When the spool cannot take it, it is kept in memory (never lost while the
        gateway lives), written first once the spool takes writes again, and the future says False."""
        return self._write(Settle(dict(fields), opened))  # a copy: what is written is what was served

    def _write(self, write: Write) -> asyncio.Future[bool]:
        """Joins the writes of this event-loop turn; the first schedules their commit for the start
        of the next turn, so every request that began or ended in this one shares one transaction
        and none waits longer than one turn."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self._pending:
            loop.call_soon(self._commit)
        self._pending.append((write, done))
        return done

    def _commit(self) -> None:
        pending, self._pending = self._pending, []
        writes = [w for w, _ in pending]
        ok = self._write_all([*self.unwritten, *writes])
        if ok:
            self.unwritten.clear()
        else:
            self.unwritten.extend(w for w in writes if isinstance(w, Settle))
        for _, done in pending:
            if not done.done():  # its request may have been cancelled meanwhile: the write stands
                done.set_result(ok)

    def _write_all(self, writes: list[Write]) -> bool:
        try:
            self.store.write(writes)
        except (sqlite3.Error, OSError) as exc:
            if self.spool_error is None:
                log.error("usage spool cannot be written (%s): refusing requests until it can", exc)
            self.spool_error = str(exc)
            self.metrics.spool_errors.add()
            return False
        if self.spool_error is not None:
            log.warning("usage spool writable again; every record kept in memory is written")
            self.spool_error = None
        return True

    def flush(self) -> bool:
        """Writes the records kept in memory; True when the spool takes records again."""
        if self.unwritten and self._write_all(list(self.unwritten)):
            self.unwritten.clear()
        return not self.unwritten

    def authenticate(self, presented: str) -> KeyEntry | None:
        kid = key_id(presented)
        entry = self.keys.get(kid) if kid else None
        if entry is None:
            return None
        if not hmac.compare_digest(hash_key(presented), entry.hash):
            return None
        if entry.expires_at is not None and entry.expires_at <= self.clock():
            return None
        if self.quota_states(entry) is None:
            return None  # its member was removed: ``apply`` publishes the members before the keys
        return entry
