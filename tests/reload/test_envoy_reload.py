"""Config reloads while traffic flows through a real Envoy: nothing fails, state survives.

1,000 requests (20 in flight at a time) go client -> Envoy -> picker -> backend while the
config is reloaded 20 times, alternating valid and invalid versions. The valid versions
change the profile (weights, an extra scorer) but declare the prefix producer with the
same name, type and parameters, so its learned index must carry over every time.
"""

from __future__ import annotations

import asyncio
import textwrap

import aiohttp
import orjson
import pytest

from epp import metrics
from epp.config.loader import ConfigError
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from sluice.gateway import envoy_config
from sluice.gateway.envoy_process import EnvoyProcess
from tests.support.backends import backends
from tests.support.picker import fresh_metrics, running_picker, wait_for

pytestmark = pytest.mark.envoy

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
REQUESTS = 1000
IN_FLIGHT = 20
RELOADS = 20
HEADER = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"


def _valid(version: int) -> str:
    extra = "- {pluginRef: running-requests-size-scorer}\n" if version % 2 else ""
    return (
        HEADER
        + textwrap.dedent("""
        plugins:
        - {type: approx-prefix-cache-producer, name: prefixes,
           parameters: {blockSizeTokens: 4, autoTune: false, lruCapacityPerServer: 5000}}
        - {type: prefix-cache-scorer, parameters: {prefixMatchInfoProducerName: prefixes}}
        - {type: queue-scorer}
        - {type: running-requests-size-scorer}
        schedulingProfiles:
        - name: default
          plugins:
          - {pluginRef: queue-scorer, weight: %d}
          - {pluginRef: prefix-cache-scorer, weight: 3}
    """)
        % (1 + version)
        + textwrap.indent(extra, "  ")
    )


INVALID = [
    HEADER + "plugins: [{type: queue-scorer, parameters: {weight: 2}}]\n",
    HEADER + "schedulingProfiles: [{name: a, plugins: [{pluginRef: nowhere}]}]\n",
    HEADER + "plugins: [{type: metric-scorer, parameters: {metricName: missing}}]\n",
    "kind: [unclosed\n",
]


def _reloads(result: str) -> float:
    return metrics.REGISTRY.get_sample_value("config_reload_total", {"result": result}) or 0.0


async def test_reloads_during_traffic_fail_no_request_and_keep_the_prefix_index() -> None:
    async with (
        backends(ADDRESSES) as servers,
        running_picker(
            endpoints=",".join(s.target for s in servers), config_text=_valid(0)
        ) as picker,
    ):
        options = envoy_config.GatewayOptions(
            mode=envoy_config.GatewayMode.PICKER, picker_port=picker.grpc_port
        )
        async with EnvoyProcess(options) as envoy:
            await fresh_metrics(picker)
            producer = picker.config.plugins["prefixes"]
            assert isinstance(producer, ApproxPrefixCacheProducer)
            ok_before, failed_before = _reloads("success"), _reloads("failure")
            statuses: list[int] = []
            index_sizes: list[int] = []
            done = 0
            progress = asyncio.Condition()

            async def one(session: aiohttp.ClientSession, i: int) -> None:
                nonlocal done
                # 40 distinct conversations, each prompt extending the previous one's prefix.
                prompt = f"conversation {i % 40}: " + "lorem ipsum dolor sit " * (1 + i // 40)
                body = orjson.dumps({"model": "m", "prompt": prompt, "stream": i % 3 == 0})
                async with session.post(envoy.url + "/v1/completions", data=body) as response:
                    await response.read()
                    statuses.append(response.status)
                async with progress:
                    done += 1
                    progress.notify_all()

            async def client() -> None:
                gate = asyncio.Semaphore(IN_FLIGHT)
                connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
                async with aiohttp.ClientSession(connector=connector) as session:

                    async def limited(i: int) -> None:
                        async with gate:
                            await one(session, i)

                    await asyncio.gather(*(limited(i) for i in range(REQUESTS)))

            async def reloader() -> None:
                for n in range(RELOADS):
                    async with progress:  # spread the reloads over the run
                        await progress.wait_for(lambda n=n: done >= (n + 1) * REQUESTS // 25)
                    if n % 2 == 0:
                        picker.reload_config(_valid(n + 1), f"test reload {n}")
                        assert picker.config.plugins["prefixes"] is producer
                        index_sizes.append(
                            sum(len(producer.index.blocks(k)) for k in producer.index.endpoints())
                        )
                    else:
                        with pytest.raises(ConfigError):
                            picker.reload_config(INVALID[n // 2 % len(INVALID)], "test")

            await asyncio.gather(client(), reloader())

            assert len(statuses) == REQUESTS
            assert statuses == [200] * REQUESTS
            assert sum(len(s.state.received) for s in servers) == REQUESTS
            assert _reloads("success") == ok_before + RELOADS // 2
            assert _reloads("failure") == failed_before + RELOADS // 2
            assert picker.config.plugins["prefixes"] is producer
            assert index_sizes == sorted(index_sizes) and index_sizes[0] > 0  # only grows
            await wait_for(picker.in_flight.is_idle, what="every slot released")
