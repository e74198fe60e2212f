"""The one typed contract between the manager and the tenant gateways.

The manager pushes a ``GatewayConfig`` (``PUT /admin/config`` on the gateway's admin
port) when the gateway's ``GatewayStatus`` (``GET /admin/config``) shows another version,
and collects ``UsagePage``s of ``UsageRecord``s by cursor (``GET /admin/usage``).
Both sides import these models and nothing else of each other: the gateway imports no
control-plane module.

Compatibility: a gateway keeps the last config on its volume and the manager may be a
release older or newer than the gateway for a moment during an upgrade, so every field
added after the first release has a default, and unknown fields are ignored.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from manager.domain import Quotas

HOLD_TIMEOUT_S, MAX_WAITING = 300.0, 64
"""How long a request held for a sleeping tenant waits at most, and how many are held at most:
the defaults of the host's ``GTM_WAKE_TIMEOUT_S`` and ``GTM_MAX_WAITING``."""


class Contract(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


Limits = Quotas
"""The four quotas, as ``domain.Quotas`` declares them (pydantic reads and writes the dataclass);
None is no limit. A member's limits nest inside its tenant's."""


class KeyConfig(Contract):
    id: str
    hash: str = Field(description="SHA-256 of the whole key (manager.keys.hash_key)")
    member: str = Field("", description="the member holding the key; '' in configs written before members")
    expires_at: float | None = None


class MemberConfig(Contract):
    name: str
    limits: Limits = Limits()
    weight: float = 1.0
    """Its share of the engine while members wait for it (fair queuing): 2 is twice 1's."""


class GatewayConfig(Contract):
    """Everything a gateway needs to serve a tenant; ``version`` is a hash of the rest."""

    version: str
    keys: list[KeyConfig] = []
    limits: Limits = Limits()
    """The tenant's limits: every member's requests together."""
    members: list[MemberConfig] = []
    max_model_len: int | None = None
    """The engine's context length: no request uses more tokens (prompt plus completion)."""
    max_body: int | None = None
    """The tenant's request body limit in bytes."""
    max_images: int | None = None
    """Images one chat request may carry; None: the gateway's own default."""
    max_image_pixels: int | None = None
    """Width x height of the largest image taken, read from its header; None: the gateway's default."""
    hold: bool = False
    """The tenant is asleep or waking: requests wait at the gateway (at most ``max_waiting`` of
    them, each for at most ``hold_timeout_s``) until a config without ``hold`` arrives."""
    hold_timeout_s: float = HOLD_TIMEOUT_S
    max_waiting: int = MAX_WAITING
    hold_refusal: str = ""
    """While holding: the tenant cannot wake now, and this says why with the numbers (nothing can
    be put to sleep to make room for it). Requests get a 503 with it at once instead of waiting."""
    concurrency: int | None = None
    """The sequences the engine runs at once: with ``fair_queue`` the gateway lets at most this
    many requests in and queues the rest per member. None: unknown (its model cannot be read)."""
    fair_queue: bool = True


class GatewayActivity(Contract):
    """What a gateway serves now (``GET /admin/activity``): the manager's sleeper reads it."""

    last_request_at: float | None
    """When it last took a request with a valid key (held ones included); None: none since it started."""
    in_flight: int
    """Requests sent to the engine and not yet answered."""
    waiting: int
    """Requests held while the tenant is asleep or waking."""
    hold: bool
    waiting_since: float | None = None
    """When the longest held request arrived: with overcommit, the longest waiting tenant wakes first."""


class EngineSleep(Contract):
    """Whether the tenant's engine sleeps in place (``/admin/engine/...``: vLLM's sleep mode, level
    1, its weights in host memory and its KV cache freed; GPU engines only)."""

    sleeping: bool


ENGINE_SLEEP_LEVEL = 1
"""vLLM's sleep level: 1 keeps the weights in host memory (a wake copies them back), 2 drops them."""


class GatewayStatus(Contract):
    """What a gateway holds now (``GET /admin/config``): the manager pushes when ``version`` differs."""

    version: str
    key_ids: list[str] = []
    limits: Limits = Limits()
    members: list[MemberConfig] = []


class UsageRecord(Contract):
    """One forwarded request, written by the gateway before the response's last byte."""

    request_id: str
    key_id: str
    member: str = Field("", description="'' in records written before members: the key's member is meant")
    model: str
    path: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    outcome: str = Field(
        description="ok; error (the engine refused it); engine_error (the engine failed while answering: its own"
        " count of what it generated); client_disconnected (the client left: prompt and what was generated by"
        " then); client_stalled (the client read nothing for GTM_GATEWAY_STALL_TIMEOUT_S: the same);"
        " interrupted (the gateway died while serving it: what it had saved, at most a second old)"
    )
    latency_ms: float
    at: float
    queue_ms: float = Field(0.0, description="time it waited at the gateway for an engine slot (fair queuing)")
    first_token_ms: float | None = Field(
        None, description="streamed: from its arrival at the gateway to its first generated token; else null"
    )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


DRAINED_PAGE = "usage-page "
"""How ``manager drain-spool`` prints each page of a spool left on a swarm node (one line each,
after this prefix): the manager reads them from the one-off's logs."""


class UsagePage(Contract):
    """Records after a cursor, in order; ``cursor`` is where the next page starts."""

    records: list[UsageRecord]
    cursor: int
    spool: str = Field(
        "",
        description="the spool's identity, made with its database: cursors count within one spool, so a gateway on "
        "a new volume (its tenant placed on another node) is collected from its own start; '' from older gateways",
    )
