"""`latency-predictor`: predicts each candidate's time to first token and time per output
token, and learns from what the picker measures on real responses.

As a data producer it runs before the scorers: it builds the features of every candidate
(see `features`), predicts them with one vectorised call per model, and leaves a
`LatencyPrediction` in `request.plugin_data[<its name>]` for `latency-scorer` and
`slo-scorer`. It reads the prefix producer's match (parameter `prefixProducerName`), so
the loader puts that producer ahead of it in the profile.

Learning happens off the request path: `observe` (called by `slo-request-tracker` when a
request ends) only appends a sample to a bounded buffer; a trainer thread turns the
buffered samples into new models and swaps each in with one reference assignment, so a
prediction always uses one whole model. Until `minSamples` samples arrived the predictor
is cold: the scorers fall back to the default profile's composite of queue, KV-cache and
prefix scores, and `inference_extension_latency_predictor_warm` says 0.

The models are the plugin's state: a config reload keeps the instance while its name,
type and parameters are unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter

import numpy as np
import numpy.typing as npt

from epp import metrics, parameters
from epp.datastore.snapshot import EndpointKey
from epp.scheduling.interfaces import Candidate, SchedulingRequest
from epp.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer
from epp.slo import features
from epp.slo.model import Array, LatencyModel, SufficientStatistics

# One trainer thread for every predictor of the process: training is rare and short.
_TRAINER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="latency-trainer")
MIN_TTFT_S = 1e-3  # a prediction below this is the model extrapolating, not a latency
MIN_TPOT_S = 1e-4


@dataclass(frozen=True, slots=True)
class PredictorSettings:
    min_samples: int = 100
    retrain_interval_s: float = 1.0
    retrain_samples: int = 200  # retrain at once when this many new samples wait
    sample_half_life: int = 2000  # samples after which an old one weighs half
    max_buffered_samples: int = 20_000
    prefix_producer: str = ApproxPrefixCacheProducer.type_name

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / self.sample_half_life)


@dataclass(frozen=True, slots=True)
class Sample:
    key: EndpointKey
    ttft_row: Array | None  # None: no TTFT measured
    ttft_s: float
    tpot_row: Array | None
    tpot_s: float


class LatencyPrediction:
    """One request's predictions, aligned with its candidates."""

    __slots__ = (
        "keys",
        "predictor",
        "tpot_rows",
        "tpot_s",
        "ttft_amortized_s",
        "ttft_rows",
        "ttft_s",
        "warm",
    )

    def __init__(
        self,
        predictor: LatencyPredictor,
        keys: Sequence[EndpointKey],
        ttft_rows: Array,
        tpot_rows: Array,
        ttft_s: Array,
        tpot_s: Array,
        warm: bool,
        ttft_amortized_s: Array | None = None,
    ) -> None:
        self.predictor = predictor
        self.keys = keys
        self.ttft_rows = ttft_rows
        self.tpot_rows = tpot_rows
        self.ttft_s = ttft_s
        self.tpot_s = tpot_s
        self.warm = warm
        # TTFT with a cache miss's extra prefill shared among the requests in flight with
        # the same prefix (see `amortized_ttft`); the plain TTFT when nothing is shared.
        self.ttft_amortized_s = ttft_s if ttft_amortized_s is None else ttft_amortized_s

    def for_candidates(self, candidates: Sequence[Candidate]) -> tuple[Array, Array]:
        """TTFT and TPOT predictions aligned with `candidates`, which filters after the
        producer (e.g. the saturation filter) may have narrowed down."""
        rows = self._rows(candidates)
        if rows is None:
            return self.ttft_s, self.tpot_s
        return self.ttft_s[rows], self.tpot_s[rows]

    def amortized_for(self, candidates: Sequence[Candidate]) -> Array:
        """Amortized TTFT predictions aligned with `candidates`."""
        rows = self._rows(candidates)
        return self.ttft_amortized_s if rows is None else self.ttft_amortized_s[rows]

    def _rows(self, candidates: Sequence[Candidate]) -> npt.NDArray[np.intp] | None:
        keys = self.keys
        if len(candidates) == len(keys) and all(
            c.endpoint.key == k for c, k in zip(candidates, keys, strict=True)
        ):
            return None
        position = {key: i for i, key in enumerate(keys)}
        return np.fromiter((position[c.endpoint.key] for c in candidates), dtype=np.intp)

    def row_of(self, key: EndpointKey) -> int | None:
        try:
            return list(self.keys).index(key)
        except ValueError:
            return None


def amortized_ttft(ttft: Array, if_cached: Array, sharing: int) -> Array:
    """A cache miss is an investment: the prefix it copies to an endpoint serves the
    requests that share it there afterwards. Its extra prefill (the prediction minus the
    prediction had the endpoint held the prefix) is therefore shared among this request
    and the `sharing` requests in flight with the same prefix — by Little's law about as
    many as will arrive while this one is served. A cold prefix (sharing 0) pays the whole
    miss; a hot prefix whose holders queue gets a new holder once the queue costs more
    than its share of a prefill."""
    extra = np.maximum(ttft - if_cached, 0.0)
    return np.maximum(ttft - extra * (sharing / (1.0 + sharing)), MIN_TTFT_S)


class LatencyPredictor:
    type_name = "latency-predictor"

    def __init__(self, name: str = type_name, settings: PredictorSettings | None = None) -> None:
        self.name = name
        self.settings = settings or PredictorSettings()
        self.required_producer = self.settings.prefix_producer
        self.in_flight = features.InFlight()
        width_ttft, width_tpot = len(features.TTFT_FEATURES), len(features.TPOT_FEATURES)
        self._ttft = LatencyModel(np.zeros(width_ttft))
        self._tpot = LatencyModel(np.zeros(width_tpot))
        self._ttft_stats = SufficientStatistics(width_ttft, self.settings.decay)
        self._tpot_stats = SufficientStatistics(width_tpot, self.settings.decay)
        self._buffer: collections.deque[Sample] = collections.deque(
            maxlen=self.settings.max_buffered_samples
        )
        self._training = threading.Lock()  # held while a training round is queued or runs
        self._last_training = 0.0
        self._keep: frozenset[Hashable] | None = None
        self.trainings = 0

    @classmethod
    def from_parameters(cls, name: str, params: Mapping[str, object] | None) -> LatencyPredictor:
        reader = parameters.ParameterReader(params)
        defaults = PredictorSettings()
        settings = PredictorSettings(
            min_samples=reader.integer("minSamples", defaults.min_samples, minimum=1),
            retrain_interval_s=reader.duration(
                "retrainInterval", defaults.retrain_interval_s, positive=True
            ),
            retrain_samples=reader.integer("retrainSamples", defaults.retrain_samples, minimum=1),
            sample_half_life=reader.integer(
                "sampleHalfLife", defaults.sample_half_life, minimum=10
            ),
            max_buffered_samples=reader.integer(
                "maxBufferedSamples", defaults.max_buffered_samples, minimum=100
            ),
            prefix_producer=reader.string("prefixProducerName", defaults.prefix_producer),
        )
        reader.finish()
        return cls(name, settings)

    def same_settings(self, other: object) -> bool:
        return type(other) is type(self) and other.settings == self.settings

    # ---- prediction (the event loop) --------------------------------------------------

    @property
    def warm(self) -> bool:
        return self._ttft.samples >= self.settings.min_samples

    @property
    def samples(self) -> int:
        """Samples the model in force learned from."""
        return self._ttft.samples

    @property
    def buffered(self) -> list[Sample]:
        """Samples waiting for the next training round."""
        return list(self._buffer)

    def produce(self, request: SchedulingRequest, candidates: Sequence[Candidate]) -> None:
        started = perf_counter()
        match = request.plugin_data.get(self.settings.prefix_producer)
        cached = features.matched_tokens(match, candidates)
        ttft_rows = features.ttft_features(
            request.input_tokens, candidates, cached, self.in_flight, time.monotonic()
        )
        tpot_rows = features.tpot_features(candidates, self.in_flight)
        keys = [c.endpoint.key for c in candidates]
        ttft_model, tpot_model = self._ttft, self._tpot  # one whole model each
        ttft = np.maximum(ttft_model.predict(keys, ttft_rows), MIN_TTFT_S)
        tpot = np.maximum(tpot_model.predict(keys, tpot_rows), MIN_TPOT_S)
        amortized = ttft
        block = features.deepest_block(match)
        if block is not None and min(cached) < max(cached):
            if_cached = ttft_model.predict(
                keys, features.as_if_cached(ttft_rows, request.input_tokens, cached)
            )
            amortized = amortized_ttft(ttft, if_cached, self.in_flight.sharing(block))
        request.plugin_data[self.name] = LatencyPrediction(
            self, keys, ttft_rows, tpot_rows, ttft, tpot, self.warm, amortized
        )
        metrics.latency_prediction_duration_seconds.observe(perf_counter() - started)

    def features_for(self, request: SchedulingRequest, candidate: Candidate) -> tuple[Array, Array]:
        """One candidate's feature rows, for a request whose profile did not predict."""
        cached = features.matched_tokens(
            request.plugin_data.get(self.settings.prefix_producer), [candidate]
        )
        ttft = features.ttft_features(
            request.input_tokens, [candidate], cached, self.in_flight, time.monotonic()
        )
        return ttft[0], features.tpot_features([candidate], self.in_flight)[0]

    def predict_ttft(self, key: EndpointKey, row: Array) -> float:
        """The model in force's TTFT for one feature row (0 before any training)."""
        return max(float(self._ttft.predict([key], row.reshape(1, -1))[0]), MIN_TTFT_S)

    def predict_tpot(self, key: EndpointKey, row: Array) -> float | None:
        if not self.warm:
            return None
        value = float(self._tpot.predict([key], row.reshape(1, -1))[0])
        return max(value, MIN_TPOT_S)

    # ---- learning -----------------------------------------------------------------------

    def observe(self, sample: Sample) -> None:
        """A request ended with measured latencies (event loop; never blocks)."""
        self._buffer.append(sample)
        now = time.monotonic()
        due = (
            len(self._buffer) >= self.settings.retrain_samples
            or now - self._last_training >= self.settings.retrain_interval_s
        )
        if due and self._training.acquire(blocking=False):
            self._last_training = now
            _TRAINER.submit(self._train)

    def retain(self, keys: Iterable[EndpointKey]) -> None:
        """Forget endpoints that left the pool (at the next training round)."""
        self._keep = frozenset(keys)

    def train_now(self) -> None:
        """Train on what is buffered, on the caller's thread (tests, benchmarks)."""
        with self._training:
            self._train_round()

    def _train(self) -> None:
        try:
            self._train_round()
        finally:
            self._training.release()

    def _train_round(self) -> None:
        started = perf_counter()
        batch: dict[tuple[bool, EndpointKey], tuple[list[Array], list[float]]] = {}
        while self._buffer:
            sample = self._buffer.popleft()
            for is_ttft, row, target in (
                (True, sample.ttft_row, sample.ttft_s),
                (False, sample.tpot_row, sample.tpot_s),
            ):
                if row is not None:
                    rows, targets = batch.setdefault((is_ttft, sample.key), ([], []))
                    rows.append(row)
                    targets.append(target)
        for (is_ttft, key), (rows, targets) in batch.items():
            stats = self._ttft_stats if is_ttft else self._tpot_stats
            stats.add(key, np.array(rows), np.array(targets))
        keep = self._keep
        if keep is not None:
            self._ttft_stats.retain(keep)
            self._tpot_stats.retain(keep)
        if batch or keep is not None:
            self._ttft = self._ttft_stats.solve()
            self._tpot = self._tpot_stats.solve()
        self.trainings += 1
        metrics.latency_predictor_samples.labels(self.name).set(self._ttft.samples)
        metrics.latency_predictor_warm.labels(self.name).set(1 if self.warm else 0)
        metrics.latency_predictor_training_seconds.labels(self.name).observe(
            perf_counter() - started
        )
        metrics.latency_predictor_last_training.labels(self.name).set_to_current_time()
