"""Adapters to outside systems. ``docker`` and its swarm subclass ``swarm`` are the only modules
that import the Docker SDK."""
