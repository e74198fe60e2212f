"""Every name and label of every Docker resource the product creates.

Actual state is found by these labels, never by guessing names. ``instance``
namespaces one installation (and each test session) from another.
"""

from __future__ import annotations

import re
from enum import StrEnum

from manager.errors import InvalidInput

LABEL_PREFIX = "org.gtm."
MANAGED = LABEL_PREFIX + "managed"
INSTANCE = LABEL_PREFIX + "instance"
TENANT = LABEL_PREFIX + "tenant"
ROLE = LABEL_PREFIX + "role"
SPEC_HASH = LABEL_PREFIX + "spec-hash"
DEVICE = LABEL_PREFIX + "device"
"""The device (GPU or MIG instance UUID) of a resource that belongs to one, not to a tenant."""

NODE = LABEL_PREFIX + "node"
"""The swarm node (its ID) a tenant's gateway is placed on: where its spool is, should the node be lost."""

TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")


class Role(StrEnum):
    ENGINE = "engine"
    GATEWAY = "gateway"
    NETWORK = "network"
    VOLUME = "volume"
    PROBE = "probe"
    WARMUP = "warmup"
    PREPARE = "prepare"
    CONVERT = "convert"
    MPS = "mps"
    AGENT = "agent"


def _validate(name: str, what: str, why: str) -> str:
    if not TENANT_NAME.match(name):
        raise InvalidInput(
            f"invalid {what} name {name!r}: use 2-32 lowercase letters, digits and '-', "
            f"starting with a letter and not ending with '-' ({why})"
        )
    return name


def validate_tenant_name(name: str) -> str:
    return _validate(name, "tenant", "it becomes part of DNS and Docker names")


def validate_member_name(name: str) -> str:
    """Members follow the tenant rule (they appear in metrics labels, CSV files and URLs). A tenant's
    first member, made by add-tenant, is named like the tenant."""
    return _validate(name, "member", "the same rule as tenant names")


def labels(instance: str, role: Role, tenant: str | None = None, **extra: str) -> dict[str, str]:
    out = {MANAGED: "true", INSTANCE: instance, ROLE: role.value}
    if tenant is not None:
        out[TENANT] = tenant
    out.update({LABEL_PREFIX + key.replace("_", "-"): value for key, value in extra.items()})
    return out


def selector(instance: str, **match: str) -> list[str]:
    """Docker ``label=`` filters that select this instance's resources."""
    out = [f"{MANAGED}=true", f"{INSTANCE}={instance}"]
    out += [f"{LABEL_PREFIX}{key}={value}" for key, value in match.items()]
    return out


def network(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}"


def volume(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-data"


def engine(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-engine"


def gateway(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-gateway"


def gateway_volume(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-gw"


def drain(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-drain"


def move_data(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-move"


def prepare(instance: str, tenant: str) -> str:
    return f"{instance}-t-{tenant}-prepare"


def port_probe(instance: str, port: int) -> str:
    return f"{instance}-port-probe-{port}"


def warmup(instance: str, node: str = "") -> str:
    """The page-cache warm-up; on a swarm one per node (they run at once on different nodes)."""
    return f"{instance}-engine-warmup" + (f"-{node[:12]}" if node else "")


def converter(instance: str, model: str) -> str:
    """The one-off container converting a GGUF file into the model ``model`` (a valid model name
    is a valid container name suffix)."""
    return f"{instance}-convert-{model}"


def mps_daemon(instance: str, device: str) -> str:
    """The MPS control daemon of one device (GPU or MIG instance), named by its UUID: an old-style
    MIG UUID's slashes become dashes."""
    return f"{instance}-mps-" + re.sub(r"[^A-Za-z0-9_.-]", "-", device)


def node_agent(instance: str) -> str:
    """The node agents' global service (one task on every node of a swarm)."""
    return f"{instance}-node-agent"


def control_network(instance: str) -> str:
    return f"{instance}-control"


ENGINE_ALIAS = "engine"
"""DNS name of a tenant's engine on the tenant's own network."""
GATEWAY_ALIAS = "gateway"
