"""Envoy in front of the picker: gateway options (`settings`), bootstrap rendering
(`envoy_config`), running a real Envoy (`envoy_process`), and a port helper (`ports`)."""
