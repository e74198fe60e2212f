"""The tenant gateway: one per tenant, on the tenant's network beside its engine and
published on the tenant's port. Checks keys, enforces quotas, meters tokens and
forwards an allowlist of OpenAI paths. It keeps its config and usage on its own
volume, so it serves and meters while the manager is down.

- ``quotas``: the exact, in-memory quota decisions (pure, unit-tested)
- ``store``: config and usage records in SQLite on the gateway's volume
- ``proxy``: the public ASGI app; ``admin``: config push, usage by cursor, metrics
- ``server``: runs both on one event loop (``manager gateway``)
"""
