"""``manager node-agent``: serves its node's report (``manager.node_report``) on the agent port.
It needs the node's Docker socket (read only: it lists and measures, never changes anything) and,
in nvml mode, the node's GPUs through the NVIDIA runtime."""

from __future__ import annotations

import json
import logging
import signal
import sys
from types import FrameType
from typing import Any

from manager.agent.report import node_report
from manager.agent.server import make_server
from manager.agent.volumes import remove_volume
from manager.errors import InvalidInput
from manager.gpu import DeviceMemory, open_inventory
from manager.runtime.docker import DockerRuntime
from manager.runtime.swarm import GPU_MEMORY_RESOURCE
from manager.settings import Settings

log = logging.getLogger(__name__)


def advertised(devices: list[DeviceMemory]) -> dict[str, Any]:
    """What a GPU node's Docker must advertise to Swarm (its ``daemon.json``): each device's memory as
    the ``gpumem-<uuid>`` generic resource engines reserve (``runtime.swarm.reservations``), in MiB
    of what CUDA can have, and NVIDIA's runtime as the default (Swarm services have no ``--gpus``).
    Empty for host memory: Swarm reserves that as memory."""
    gpus = [d for d in devices if d.kind != "host-memory"]
    if not gpus:
        return {}
    resources = [f"{GPU_MEMORY_RESOURCE.format(uuid=d.uuid)}={d.usable // 1024**2}" for d in gpus]
    return {"default-runtime": "nvidia", "node-generic-resources": resources}


def print_resources(settings: Settings) -> int:
    """``manager node-agent --resources``: ``advertised`` for this node's devices, to merge into
    /etc/docker/daemon.json before the node joins the swarm."""
    inventory = open_inventory(settings.platform)
    try:
        config = advertised(inventory.devices())
    finally:
        inventory.close()
    if not config:
        print("host memory (cpu mode): Swarm reserves it as memory; nothing to add to daemon.json", file=sys.stderr)
        return 0
    print(json.dumps(config, indent=2))
    print(
        "merge this into /etc/docker/daemon.json (NVIDIA's runtime registered: nvidia-ctk runtime configure "
        "--runtime=docker), then restart dockerd",
        file=sys.stderr,
    )
    return 0


def serve(settings: Settings) -> int:
    if settings.agent_token is None:
        raise InvalidInput("GTM_AGENT_TOKEN is not set: the manager gives its node agents one token to answer")
    token = settings.agent_token.get_secret_value()
    runtime = DockerRuntime()
    node_id, hostname = runtime.node_identity()
    inventory = open_inventory(settings.platform)
    server = make_server(
        "0.0.0.0",
        settings.agent_port,
        token,
        lambda: node_report(node_id, hostname, settings.instance, inventory, runtime),
        lambda name: remove_volume(runtime, settings.instance, name),
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("node agent of %s (%s) serving on port %d", hostname, node_id or "no swarm", settings.agent_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        inventory.close()
    return 0
