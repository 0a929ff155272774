"""Admission queueing (flow control): who waits and who goes first while the pool is full.

Layers, bottom up: `workload` (the typed context a request carries), `registry` (per-workload
counters and rates), `interfaces` (queue items and the policy protocols), the policies
(`ordering`, `workload_aware`, `fairness`), `saturation` (when to stop dispatching),
`settings` (the `flowControl` config section) and `controller` (bands, limits, dispatch).
"""
