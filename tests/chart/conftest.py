from __future__ import annotations

import pytest

from tests.chart import helm as helm_binary


@pytest.fixture(scope="session")
def helm() -> helm_binary.Helm:
    try:
        return helm_binary.Helm(helm_binary.fetch())
    except helm_binary.HelmUnavailable as error:
        pytest.skip(f"no helm binary for the chart tests: {error}")
