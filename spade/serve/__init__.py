"""Serving: the synthesis service, its TorchServe adapter, archives for TorchServe and KServe, registration."""
