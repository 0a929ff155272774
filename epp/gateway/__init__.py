"""Envoy in front of the picker: bootstrap rendering (`envoy_config`), running a real
Envoy process (`envoy_process`), and port helpers (`ports`)."""
