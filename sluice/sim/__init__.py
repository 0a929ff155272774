"""The model-server simulator behind `sluice simulate`: vLLM's API and metrics, driven by a
performance model (continuous batching, prefill/decode timing, a prefix-caching KV pool,
LoRA slots) instead of a GPU.

Layers, lowest first: `tokens` (approximate tokenisation, block hashes), `prefix_cache`
(the KV block pool), `metrics_text` (counters, histograms, Prometheus text), `engine`
(the scheduler, clock-free), `realtime` (runs it against the wall clock), `faults`
(failure injection), `openai_api` (request parsing, response shapes), `config`
(`SimConfig`), `server` (`SimulatedServer`, aiohttp), `fleet` (`run_fleet`), `cli`.
"""
