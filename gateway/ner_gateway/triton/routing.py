"""Inference over the pool (the core's ``InferenceBackend`` port): round-robin over the endpoints where the model is
ready; an endpoint that turns out to be unavailable is taken out (``TritonPool.take_out``) and the call retried on
the next one (Triton inference is idempotent), within the request's deadline. A model ready nowhere fails its calls
fast with UNAVAILABLE (``ModelUnavailable``; ``TritonUnavailable`` when no endpoint is up at all)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from ner_gateway.core.deadline import Deadline
from ner_gateway.core.errors import ModelUnavailable, NerError, TritonUnavailable
from ner_gateway.core.ports import ServedModel
from ner_gateway.triton.pool import TritonPool


class TritonRouter:
    def __init__(self, pool: TritonPool, max_attempts: int = 3) -> None:
        self.pool = pool
        self.max_attempts = max_attempts
        self._round_robin = itertools.count()

    def model_ready(self, model: ServedModel) -> bool:
        return self.pool.model_ready(model)

    async def infer(self, model: ServedModel, inputs: Mapping[str, npt.NDArray[np.int64]], output: str,
                    deadline: Deadline, request_id: str = "") -> npt.NDArray[np.float32]:
        pool = self.pool
        candidates = pool.endpoints_for(model)
        if not candidates:
            if not pool.ready_endpoints:
                raise TritonUnavailable("no inference server is available; retry later")
            raise ModelUnavailable(f"model {model.name!r} version {model.version} is not ready on any inference "
                                   "server; retry later")
        start = next(self._round_robin)
        order = [candidates[(start + i) % len(candidates)] for i in range(len(candidates))]
        error: NerError | None = None
        for endpoint in order[: self.max_attempts]:
            try:
                return await pool.backend(endpoint).infer(model, inputs, output, deadline, request_id)
            except TritonUnavailable as e:
                error = await pool.take_out(endpoint, model, e, deadline.remaining())
        assert error is not None
        raise error
