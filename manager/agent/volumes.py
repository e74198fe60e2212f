"""The one change an agent makes on its node: removing a volume of its instance that a tenant left
there (``node_report.VOLUMES_PATH``). Swarm's API reaches only the manager node's volumes."""

from __future__ import annotations

from manager import names
from manager.runtime.docker import DockerRuntime


def remove_volume(runtime: DockerRuntime, instance: str, name: str) -> str | None:
    """Removes the volume ``name`` of ``instance`` (a tenant's: its labels name one) on this node, after
    the finished containers of the instance that still hold it (a one-off's, which Swarm removes in
    its own time). None: it is gone, or was never here; else why it stays: a container holds it
    that runs or is about to (created: a task being started), or it or a holder is not the
    instance's."""
    found = [v for v in runtime.volumes(names.selector(instance)) if v.name == name]
    if not found:
        return None
    if not found[0].labels.get(names.TENANT):  # the manager's state, say: never a tenant's to remove
        return f"volume {name} is not a tenant's volume of instance {instance}"
    holders = runtime.volume_users(name)
    for c in holders:
        if c.labels.get(names.MANAGED) != "true" or c.labels.get(names.INSTANCE) != instance:
            return f"volume {name} is held by container {c.name}, which is not instance {instance}'s"
        if c.status not in ("exited", "dead"):
            return f"volume {name} is in use by container {c.name} ({c.status})"
    for c in holders:
        runtime.remove_container(c.name)
    runtime.remove_volume(name)
    return None
