"""Envoy's external-processing protocol: one gRPC stream per HTTP request, protocol only."""
