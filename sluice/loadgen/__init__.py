"""`sluice bench`: the load tool every routing benchmark uses.

Workloads that matter for routing (shared prefixes, multi-turn chat, LoRA mixes, workload
criticality and SLO headers) are sent open-loop (Poisson arrivals at a rate) or closed-loop
(fixed concurrency); every request is recorded (TTFT, TPOT, latency, status, serving pod)
as JSON lines and summarised as a table and, with matplotlib installed, PNG plots.
"""
