"""Members: the accounting boundary inside a tenant. One engine, many members, each with
their own keys (shown once, rotated with a grace period), their own quotas nested in the
tenant's (the gateway admits a request only if both allow it) and their own usage.

``add-tenant`` makes a tenant's first member, named like the tenant; it holds the key
add-tenant prints, and ``rotate-key --name T`` without ``--member`` rotates its key.
Every change is audited and handed to the reconciler, which pushes the gateway's config.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from manager import keys, names
from manager.control.reconciler import Reconciler
from manager.control.records import KeyRow, MemberRow, MemberUsage, TenantRow, UsageTotals
from manager.control.store import TenantStore
from manager.domain import MAX_GRACE_S, Quotas, TenantStatus, check_quotas
from manager.errors import Conflict, InvalidInput, NotFound
from manager.utc import start_of_day, start_of_month


@dataclass(frozen=True)
class MemberView:
    """A member with its keys and its metered use (today, this month, last request)."""

    row: MemberRow
    keys: list[KeyRow]
    usage: MemberUsage


def check_grace(grace_s: float) -> None:
    if not 0 <= grace_s <= MAX_GRACE_S:  # also refuses NaN
        raise InvalidInput(
            f"grace period must be 0 (revoke the old keys at once) to {MAX_GRACE_S:.0f} seconds, got {grace_s}"
        )


def removing_refusal(tenant: str) -> str:
    """The one refusal of any change to a tenant being removed."""
    return (
        f"tenant {tenant!r} is being removed, so nothing of it can change any more; "
        "list-tenants shows it until it is gone (then its name is free again)"
    )


MIN_WEIGHT, MAX_WEIGHT = 0.1, 100.0


def check_weight(weight: float) -> float:
    """A member's weight in its tenant's fair queue: 2 gets twice the engine of 1 while both wait."""
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise InvalidInput(
            f"weight {weight:g} is out of range: give {MIN_WEIGHT:g} to {MAX_WEIGHT:g} (1 is everyone's default; "
            "2 gets twice the share of the engine of 1 while both have requests waiting)"
        )
    return float(weight)


class MemberService:
    def __init__(self, store: TenantStore, reconciler: Reconciler, lock: threading.Lock) -> None:
        self.store = store
        self.reconciler = reconciler
        self._lock = lock  # the tenant service's: no member change races a tenant's removal

    def rotate_key(self, name: str, actor: str, grace_s: float, member: str | None = None) -> keys.IssuedKey:
        """A new key for one member (by default the tenant's first member, named like the tenant);
        the member's older keys stay valid for ``grace_s`` seconds."""
        check_grace(grace_s)
        issued = keys.issue()
        with self._lock:
            self._changeable(name)
            if member is None:
                if not any(m.name == name for m in self.store.members(name)):
                    raise NotFound(
                        f"tenant {name!r} has no first member named {name!r} any more (it was removed): "
                        f"pass --member (list-members --tenant {name} shows them)"
                    )
                member = name
            self.store.member(name, member)
            now = time.time()
            with self.store.transaction() as db:
                self.store.expire_keys(db, name, member, now + grace_s)
                self.store.insert_key(db, KeyRow(issued.id, name, keys.PREFIX, issued.hash, now, None, None, member))
                self.store.audit(
                    actor,
                    "rotate-key",
                    name,
                    "ok",
                    {"member": member, "key_id": issued.id, "grace_s": grace_s},
                    tx=db,
                )
        self.reconciler.enqueue(name)
        return issued

    def revoke_key(self, tenant: str, key_id: str, actor: str) -> None:
        """Ends one key now (refused on the tenant port once the gateway has the new config)."""
        with self._lock:
            self._changeable(tenant)
            if not any(k.id == key_id for k in self.store.keys(tenant)):
                raise NotFound(f"tenant {tenant!r} has no key {key_id!r}; list-keys --tenant {tenant} shows them")
            with self.store.transaction() as db:
                self.store.expire_key(db, tenant, key_id, time.time())
                self.store.audit(actor, "revoke-key", tenant, "ok", {"key_id": key_id}, tx=db)
        self.reconciler.enqueue(tenant)

    def _changeable(self, tenant: str) -> TenantRow:
        """The tenant, unless it is being removed: then nothing of it changes any more (its keys,
        members and limits go with it). Called under the lock, which ``remove`` takes too."""
        row = self.store.tenant(tenant)
        if row.status == TenantStatus.REMOVING:
            raise Conflict(removing_refusal(tenant))
        return row

    def add(
        self, tenant: str, name: str, quotas: Quotas, actor: str, weight: float | None = None
    ) -> tuple[MemberRow, keys.IssuedKey]:
        """A member with its own key (returned once), quotas nested in the tenant's and its weight in
        the tenant's fair queue (default 1)."""
        names.validate_member_name(name)
        check_quotas(quotas)
        weight = check_weight(1.0 if weight is None else weight)
        issued = keys.issue()
        now = time.time()
        with self._lock:
            self._changeable(tenant)
            with self.store.transaction() as db:
                self.store.insert_member(db, tenant, name, quotas, now, weight)
                self.store.insert_key(db, KeyRow(issued.id, tenant, keys.PREFIX, issued.hash, now, None, None, name))
                detail = {"member": name, "key_id": issued.id, **quotas.__dict__, "weight": weight}
                self.store.audit(actor, "add-member", tenant, "ok", detail, tx=db)
        self.reconciler.enqueue(tenant)
        return self.store.member(tenant, name), issued

    def update(
        self, tenant: str, name: str, quotas: dict[str, int | None], actor: str, weight: float | None = None
    ) -> MemberRow:
        """Changes a member's quotas (given ones only; None lifts a limit) and its weight (None:
        unchanged); applied live."""
        with self._lock:
            self._changeable(tenant)
            row = self.store.member(tenant, name)
            new = Quotas(**{**row.quotas.__dict__, **quotas})
            check_quotas(new)
            new_weight = row.weight if weight is None else check_weight(weight)
            if new == row.quotas and new_weight == row.weight:
                raise InvalidInput(
                    "nothing to change: pass at least one quota, or a --weight, that differs from the current one"
                )
            with self.store.transaction() as db:
                self.store.update_member(db, tenant, name, new, new_weight)
                detail = {"member": name, **quotas, **({"weight": new_weight} if weight is not None else {})}
                self.store.audit(actor, "update-member", tenant, "ok", detail, tx=db)
        self.reconciler.enqueue(tenant)
        return self.store.member(tenant, name)

    def remove(self, tenant: str, name: str, actor: str) -> None:
        """Removes the member and its keys (refused on the tenant port once the gateway has the new
        config, within seconds); its usage stays for cost sharing."""
        with self._lock:
            self._changeable(tenant)
            self.store.member(tenant, name)
            with self.store.transaction() as db:
                self.store.delete_member(db, tenant, name)
                self.store.audit(actor, "remove-member", tenant, "ok", {"member": name}, tx=db)
        self.reconciler.enqueue(tenant)

    def views(self, tenant: str, now: float | None = None) -> list[MemberView]:
        """Every member with its keys and usage today and this month (UTC)."""
        self.store.tenant(tenant)
        return self._views(tenant, self.store.members(tenant), now)

    def view(self, tenant: str, name: str, now: float | None = None) -> MemberView:
        """One member with its keys and usage (NotFound for an unknown tenant or member)."""
        (view,) = self._views(tenant, [self.store.member(tenant, name)], now)
        return view

    def _views(self, tenant: str, members: list[MemberRow], now: float | None) -> list[MemberView]:
        now = time.time() if now is None else now
        usage = self.store.member_usage(tenant, start_of_day(now), start_of_month(now))
        empty = MemberUsage(UsageTotals(0, 0, 0), UsageTotals(0, 0, 0), None)
        return [MemberView(m, self.store.keys(tenant, m.name), usage.get(m.name, empty)) for m in members]
