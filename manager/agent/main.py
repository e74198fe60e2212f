"""``manager node-agent``: serves its node's report (``manager.node_report``) on the agent port.
It needs the node's Docker socket (read only: it lists and measures, never changes anything) and,
in nvml mode, the node's GPUs through the NVIDIA runtime."""

from __future__ import annotations

import logging
import signal
import sys
from types import FrameType

from manager.agent.report import node_report
from manager.agent.server import make_server
from manager.errors import InvalidInput
from manager.gpu import open_inventory
from manager.runtime.docker import DockerRuntime
from manager.settings import Settings

log = logging.getLogger(__name__)


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
