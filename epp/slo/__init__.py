"""SLO-aware and predicted-latency routing, as plugins of the framework.

`predictor` (`latency-predictor`, a data producer with an online model, see `model` and
`features`), `tracker` (`slo-request-tracker`, a lifecycle plugin that feeds it),
`scorers` (`latency-scorer`, `slo-scorer`) and `profile_handler` (`slo-profile-handler`).
Nothing on the request path knows about SLOs beyond reading the objectives a request
carries.
"""
