"""Scheduling plugins, one concept per module, each registered by type in `epp.config.registry`."""
