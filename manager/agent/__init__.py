"""The node agent (``manager node-agent``): on a swarm, one task on every node, reporting what
only that node can measure (``manager.node_report``)."""
