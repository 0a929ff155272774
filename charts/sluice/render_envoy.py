"""Writes files/envoy-<FailureMode>-<tls|plaintext>.json: the sidecar Envoy's bootstrap,
rendered by the same code the demo and the gateway tests run (tests check the files are
current). The chart picks the file matching `envoy.failureMode` and `picker.secureServing`.

    python charts/sluice/render_envoy.py
"""

from __future__ import annotations

import json
from pathlib import Path

from sluice.gateway import envoy_config
from sluice.gateway.settings import FailureMode, GatewayOptions

FILES = Path(__file__).resolve().parent / "files"
LISTEN_PORT = 8081  # the chart substitutes envoy.port for it


TRANSPORTS = {"tls": True, "plaintext": False}


def render(failure_mode: FailureMode, transport: str = "tls") -> str:
    options = GatewayOptions(
        listen_host="0.0.0.0",
        listen_port=LISTEN_PORT,
        admin_host="127.0.0.1",
        admin_port=19000,
        picker_host="127.0.0.1",  # the picker runs in the same pod
        picker_port=9002,
        picker_tls=TRANSPORTS[transport],
        failure_mode=failure_mode,
    )
    return json.dumps(envoy_config.render_bootstrap(options), indent=2, sort_keys=True) + "\n"


def main() -> None:
    for old in FILES.glob("envoy-*.json"):
        old.unlink()
    for mode in FailureMode:
        for transport in TRANSPORTS:
            path = FILES / f"envoy-{mode.value}-{transport}.json"
            path.write_text(render(mode, transport), encoding="utf-8")


if __name__ == "__main__":
    main()
