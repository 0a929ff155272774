"""Envoy in front of the picker: gateway options (`settings`), bootstrap rendering
(`envoy_config`), running a real Envoy (`envoy_process`), a port helper (`ports`), the
picker and Envoy together on this machine (`local`) and `sluice gateway` (`cli`)."""
