"""Encrypted tenant volumes: the host side (images, loop devices, mounts, fscrypt keys) and the
wrapping of their keys. The control plane drives them through ``manager.control.vault``."""
