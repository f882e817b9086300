"""Dataset tracing on Ray: one task per fact, spread over worker processes or machines.

:func:`lens_rome.tracing.dataset.trace_dataset` calls :func:`trace_on_ray` when
given ``workers`` (start a local Ray runtime with that many CPUs) or
``address`` (join an existing cluster, e.g. ``"auto"`` or ``"host:6379"``).
Each worker is a Ray actor that holds the model and traces one fact per task;
the driver writes every finished fact to the run's store at once, so a stopped
distributed run resumes like a single-process one, and the results are the
same numbers (each fact's noise comes from its own seed).

Workers get the model either by name (each loads it with
:func:`lens_rome.load_model`, from its own cache: right for a cluster) or, when
``trace_dataset`` is given a loaded model, as that object through Ray's object
store (any HookedTransformer, edited or not).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from lens_rome.checks import positive_int
from lens_rome.model.backend import Model
from lens_rome.model.loading import load_model
from lens_rome.tracing.fact import TraceSettings, trace_fact
from lens_rome.tracing.store import FactStore

log = logging.getLogger(__name__)

RETRIES = 3  # restarts of a dead worker, and retries of the fact it was tracing


class FactTracer:
    """A Ray actor's state: one model, traced fact after fact."""

    def __init__(self, model: Model | str, settings: TraceSettings, threads: int,
                 backend: str | None = None):
        torch.set_num_threads(threads)
        self.model = load_model(model, backend=backend) if isinstance(model, str) else model
        self.settings = settings

    def trace(self, fact: Mapping) -> tuple[int, pd.DataFrame]:
        return int(fact["known_id"]), trace_fact(self.model, fact, self.settings)


def _import_ray():
    try:
        import ray  # noqa: PLC0415 (an optional dependency)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "tracing on several workers needs Ray: pip install 'ray>=2.9' "
            "(or leave out --workers/--address to trace in this process)"
        ) from None
    return ray


def _join(ray, address: str) -> None:
    """Connect this driver to the cluster at ``address``, with this machine's Ray token.

    Ray >= 2.5x starts clusters with token authentication once ``~/.ray/auth_token``
    exists (any local ``ray.init()`` writes one), but only sends the token itself for
    ``address="auto"``; for an explicit address, do as it does for "auto" (a client
    that sends a token also joins a cluster without authentication).
    """
    if "RAY_AUTH_MODE" not in os.environ:
        try:
            from ray._private.authentication.authentication_token_setup import (  # noqa: PLC0415
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:  # a Ray without token authentication
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    # a cluster on loopback only accepts a driver that calls itself 127.0.0.1 too
    loopback = address.rsplit(":", 1)[0] in ("127.0.0.1", "localhost")
    try:
        ray.init(address=address, log_to_driver=False,
                 **({"_node_ip_address": "127.0.0.1"} if loopback else {}))
    except ConnectionError as error:
        cause = repr(error.__cause__) + repr(getattr(error.__cause__, "__cause__", None))
        if "Authentication" in cause or "InvalidAuthToken" in cause:
            raise ConnectionError(
                f"the Ray cluster at {address} refused this machine's authentication token "
                "(or it has none): set RAY_AUTH_TOKEN to the cluster's token, or "
                "RAY_AUTH_TOKEN_PATH to its file (see `ray get-auth-token`)") from error
        raise


def trace_on_ray(
    model: Model | str,
    facts: Sequence[Mapping],
    settings: TraceSettings,
    store: FactStore,
    *,
    workers: int | None = None,
    address: str | None = None,
    threads_per_worker: int = 1,
    progress: bool = True,
    backend: str | None = None,
) -> None:
    """Trace ``facts`` on Ray actors and write each result to ``store`` as it arrives.

    Args:
        model: a model name (workers load it, as ``backend``) or a loaded model
            (shipped to them).
        workers: actors to start; with ``address`` None, also the CPUs of the
            local runtime started here (and shut down at the end).
        address: an existing cluster; ``workers`` defaults to its CPU count.
    """
    positive_int(workers, "workers", optional=True)
    if not facts:
        return
    ray = _import_ray()
    from ray.util import ActorPool  # noqa: PLC0415 (an optional dependency)

    connected_here = not ray.is_initialized()  # then disconnect (or stop) at the end
    if connected_here:
        if address is not None:
            _join(ray, address)
        else:
            # address="local": always a new runtime, on loopback, never someone's cluster
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        if workers is None:
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        shipped = model if isinstance(model, str) else ray.put(model)
        # a worker that dies (killed, out of memory, its machine gone) is restarted and
        # its fact traced again; results are written by the driver, so once each
        actor = ray.remote(num_cpus=threads_per_worker, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(FactTracer)
        pool = ActorPool([actor.remote(shipped, settings, threads_per_worker, backend)
                          for _ in range(min(workers, len(facts)))])
        log.info("tracing %d facts on %d Ray workers", len(facts), workers)
        results = pool.map_unordered(lambda a, fact: a.trace.remote(fact), list(facts))
        for known_id, frame in tqdm(results, total=len(facts), desc="facts", unit="fact",
                                    disable=not progress):
            store.write(known_id, frame)
    finally:
        if connected_here:  # stops a runtime started here; only disconnects from a cluster
            ray.shutdown()
