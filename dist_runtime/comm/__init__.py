"""Communicators: the data plane (tensors) and control plane (Steps) between ranks."""
