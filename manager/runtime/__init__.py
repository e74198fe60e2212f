"""Adapters to outside systems. ``docker`` is the only module that imports the Docker SDK."""
