"""The command line and the tools around the picker: the `sluice` console script, the
vLLM simulator, the load tool, the Envoy gateway (bootstrap rendering, process) and the demo.

The picker itself is the `epp` package, which never imports this one.
"""
