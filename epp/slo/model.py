"""The latency model: ridge regression per endpoint, shrunk towards a pooled model.

Why this family (measured in `bench/latency_predictor.py`, figures in bench/README.md):
time to first token on a continuous-batching server is, to first order, linear in the work
ahead of the request — queued requests, prefills in progress, the prompt's uncached
tokens, the running batch — with coefficients that are the server's speed. Coefficients
are kept non-negative (more work never makes a request faster): the samples a healthy
pool produces are mostly prefix-cache hits, and an unconstrained fit extrapolates to
nonsense for the misses it rarely sees. A linear model per endpoint therefore fits
a heterogeneous pool (a slow server simply has larger coefficients), trains in closed form
from sufficient statistics (XᵀX, Xᵀy) that an online stream updates cheaply, and predicts
every candidate with one multiply-and-sum.

Endpoints with few samples borrow strength from the pool: each endpoint's coefficients
solve (XₑᵀXₑ + λI) βₑ = Xₑᵀyₑ + λ sₑ β_pool, so an endpoint starts at the pool's
model and moves to its own as its samples arrive. The pool's model is a shape β_pool
times a speed sₑ per endpoint (fitted together, `_pooled_shape`), not one average: the
picker sends a slow server mostly short, cached requests, whose samples cannot tell a
fixed cost from a per-token one, and the average would predict its rare long prefill at
a fast server's cost (at under half of it in `tests/slo/test_predictor.py`). An endpoint
never seen gets the shape at the median speed. Old samples fade (each training round
multiplies the statistics by `decay` per sample seen), so the model follows a pool whose
load or hardware changes.

Everything here is pure: `LatencyModel` is immutable once built and safe to read from the
event loop while the trainer builds the next one on another thread.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

RIDGE = 1e-3  # keeps the pooled solve well-posed when a feature never varies
PRIOR_WEIGHT = 5.0  # how many samples' worth an endpoint's pull towards the pool is
SCALE_ROUNDS = 3  # alternating rounds fitting the pool's shape and each endpoint's speed
MAX_SPEED_RATIO = 20.0  # an endpoint's speed factor is kept within 1/20..20 of the pool


@dataclass(frozen=True)
class LatencyModel:
    """Coefficients per endpoint (rows of `features.TTFT_FEATURES` width) and the pool's."""

    pooled: Array
    per_endpoint: Mapping[Hashable, Array] = field(default_factory=dict)
    samples: int = 0

    def coefficients(self, keys: Iterable[Hashable]) -> Array:
        """One row per key: its own coefficients, or the pool's for an unknown endpoint."""
        get, pooled = self.per_endpoint.get, self.pooled
        return np.array([get(key, pooled) for key in keys])

    def predict(self, keys: Iterable[Hashable], features: Array) -> Array:
        """Predictions for every row of `features` (one row per key), in one call."""
        return np.einsum("ij,ij->i", features, self.coefficients(keys))


class SufficientStatistics:
    """XᵀX and Xᵀy per endpoint, fading with `decay` per sample. Owned by one trainer."""

    def __init__(self, width: int, decay: float) -> None:
        self.width = width
        self.decay = decay
        self.xtx: dict[Hashable, Array] = {}
        self.xty: dict[Hashable, Array] = {}
        self.count: dict[Hashable, float] = {}  # effective samples per endpoint
        self.seen = 0

    def add(self, key: Hashable, rows: Array, targets: Array) -> None:
        xtx = self.xtx.get(key)
        if xtx is None:
            xtx = self.xtx[key] = np.zeros((self.width, self.width))
            self.xty[key] = np.zeros(self.width)
            self.count[key] = 0.0
        fade = self.decay ** len(rows)
        xtx *= fade
        self.xty[key] *= fade
        self.count[key] = self.count[key] * fade + len(rows)
        xtx += rows.T @ rows
        self.xty[key] += rows.T @ targets
        self.seen += len(rows)

    def retain(self, keys: frozenset[Hashable]) -> None:
        for key in [k for k in self.xtx if k not in keys]:
            del self.xtx[key], self.xty[key], self.count[key]

    def solve(self, scaled_prior: bool = True) -> LatencyModel:
        """The model of these statistics. `scaled_prior=False` shrinks every endpoint to the
        pooled coefficients as they are (the model until 2026-12-03; kept for
        `bench/latency_predictor.py`'s comparison)."""
        width = self.width
        eye = np.eye(width)
        if not self.xtx:
            return LatencyModel(np.zeros(width))
        keys = list(self.xtx)
        if scaled_prior:
            shape, scale = self._pooled_shape(keys)
        else:
            pooled_xtx = np.sum([self.xtx[k] for k in keys], axis=0)
            pooled_xty = np.sum([self.xty[k] for k in keys], axis=0)
            shape = _solve_non_negative(pooled_xtx + RIDGE * eye, pooled_xty)
            scale = dict.fromkeys(keys, 1.0)
        per_endpoint = {
            key: _solve_non_negative(
                self.xtx[key] + PRIOR_WEIGHT * eye,
                self.xty[key] + PRIOR_WEIGHT * scale[key] * shape,
            )
            for key in keys
        }
        typical = float(np.median(list(scale.values())))
        return LatencyModel(shape * typical, per_endpoint, self.seen)

    def _pooled_shape(self, keys: list[Hashable]) -> tuple[Array, dict[Hashable, float]]:
        """The pool's model as one shape times a speed per endpoint: y ≈ sₑ · xᵀβ.
        Alternating least squares over the sufficient statistics: β given the speeds
        solves Σ sₑ² XₑᵀXₑ β = Σ sₑ Xₑᵀyₑ, each speed given β is βᵀXₑᵀyₑ / βᵀXₑᵀXₑβ."""
        eye = np.eye(self.width)
        scale = dict.fromkeys(keys, 1.0)
        shape = np.zeros(self.width)
        for _ in range(SCALE_ROUNDS):
            xtx = np.sum([scale[k] ** 2 * self.xtx[k] for k in keys], axis=0)
            xty = np.sum([scale[k] * self.xty[k] for k in keys], axis=0)
            shape = _solve_non_negative(xtx + RIDGE * eye, xty)
            for k in keys:
                energy = float(shape @ self.xtx[k] @ shape)
                fit = float(shape @ self.xty[k])
                raw = fit / energy if energy > 0 and fit > 0 else 1.0
                scale[k] = min(max(raw, 1 / MAX_SPEED_RATIO), MAX_SPEED_RATIO)
            # Speeds are relative: keep their geometric mean at 1 so β carries the units.
            mean = float(np.exp(np.mean(np.log(list(scale.values())))))
            scale = {k: v / mean for k, v in scale.items()}
            shape = shape * mean
        return shape, scale


def _solve_non_negative(a: Array, b: Array) -> Array:
    """β >= 0 minimising the quadratic whose normal equations are a β = b: solve, pin the
    most negative coefficient at 0, solve the rest again (a is small and positive
    definite, so this active-set loop ends within its width)."""
    free = list(range(len(b)))
    beta = np.zeros(len(b))
    while free:
        solution = _solve(a[np.ix_(free, free)], b[free])
        worst = int(np.argmin(solution))
        if solution[worst] >= 0:
            beta[free] = solution
            break
        del free[worst]
    return beta


def _solve(a: Array, b: Array) -> Array:
    try:
        return np.asarray(np.linalg.solve(a, b), dtype=np.float64)
    except np.linalg.LinAlgError:
        return np.asarray(np.linalg.lstsq(a, b, rcond=None)[0], dtype=np.float64)
