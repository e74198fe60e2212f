"""gpu-tenant-manager: share one GPU host between tenants.

Package map (the folders show the architecture):

- ``settings``, ``errors``, ``sizes``, ``names``, ``domain``: small shared pieces.
- ``gpu``: the GPU inventory behind one protocol (``nvml`` for NVIDIA, ``cpu`` for hosts without one).
- ``control``: the control plane: state store, admission, plans, reconciler, service.
- ``runtime``: the only code that speaks to Docker.
- ``api``: the admin REST API; ``cli``: the admin commands that call it.
"""

__version__ = "0.1.0"
