"""Files the `sluice demo --flow-control` and `sluice gateway --flow-control` presets load.

* `flow-control.yaml` — an `EndpointPickerConfig` with the `flowControl` gate on.
* `objectives.yaml` — the `InferenceObjective`s its bands are for: `critical` (priority
  10) and `sheddable` (priority -1); requests naming none run at priority 0.

They are plain files so that `sluice picker --config-file` and `--manifests` take them too.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

FLOW_CONTROL_CONFIG = _HERE / "flow-control.yaml"
OBJECTIVES = _HERE / "objectives.yaml"

# What a client names in `x-gateway-inference-objective` (objectives.yaml).
CRITICAL_OBJECTIVE = "critical"
SHEDDABLE_OBJECTIVE = "sheddable"
