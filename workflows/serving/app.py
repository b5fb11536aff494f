"""The Ray Serve application `mrcnn-serve` deploys: a registered model online, following its alias.

    HTTP -> Serve's proxy (one per node: `max_queued_requests` waiting, then 503 or 429 with
            Retry-After)
         -> a Segmenter replica (FastAPI: bearer token, body limit, query parameters)
         -> @serve.batch: the images of concurrent requests decoded and predicted in one model
            call, in the model's own thread (off the replica's event loop)
         <- one row per image, as `mrcnn-infer` writes it; the version that produced it in the
            row's `model_version` and the `X-Model-Version` header (`X-Replica`: which replica)

    ModelFollower (one replica, no CPU): resolves the alias every `serve.follow_every_s` and is
    the only one that does. Replicas load the version it holds, pinned (a restarted replica loads
    its peers' version, never the alias's own), and wait on it for a change: the new weights load
    beside the old ones and replace them in one assignment, so no request fails or waits for the
    load. It also sums the replicas' request counts, latencies and batch sizes for the job.

`build_app(args)` is the application builder `serve deploy` and KubeRay's RayService take (its
`args` are Hydra overrides); `mrcnn-serve` builds the same application with `application()`.

No `from __future__ import annotations` here: FastAPI reads the handlers' annotations as objects.
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from workflows.config import ServeConfig
from workflows.registry import ModelURI, ResolvedModel, resolve_model

log = logging.getLogger("workflows.serving")

VERSION_HEADER = "X-Model-Version"
# Latencies a replica keeps between reports, and the follower over the job's life (the newest).
LATENCIES_KEPT = 100_000
REPORT_EVERY_S = 2.0
# OpenMP's threads sleep between model calls instead of spinning: beside a replica, the proxy,
# its event loop and the clients need those CPUs (on 2 cores, one request at a time: 85 instead
# of 147 ms of CPU an image, 13 instead of 9.5 images/s).
REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# A replica's wait for a change of version returns after this long, to be asked again.
LONG_POLL_S = 30.0


@dataclass(frozen=True)
class Deployed:
    """What the replicas are given: the job's settings, resolved on the driver."""

    serve: ServeConfig
    model: ResolvedModel  # the model as resolved when the application was deployed
    tracking_uri: str
    token_sha256: str | None = None  # of the bearer token the requests must carry; None: none


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def application(deployed: Deployed) -> serve.Application:
    """The two deployments, bound: what `serve.run` deploys."""
    s = deployed.serve
    scaling: dict[str, Any]
    if s.min_replicas == s.max_replicas:
        scaling = {"num_replicas": s.min_replicas}
    else:
        scaling = {"autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.target_ongoing_requests}}
    follower = ModelFollower.bind(deployed)
    segmenter = Segmenter.options(
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "runtime_env": {"env_vars": REPLICA_ENV}},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=s.overload_status, retry_after_s=s.retry_after_s),
        **({"max_replicas_per_node": s.max_replicas_per_node} if s.max_replicas_per_node else {}),
        **scaling)
    return segmenter.bind(deployed, follower)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (`import_path: workflows.serving.app:build_app` in a Serve
    config file or a RayService): `args: {overrides: [Hydra overrides]}` -> the application
    `mrcnn-serve` with those overrides deploys (the model resolved now; no MLflow run)."""
    from workflows.checks import validate
    from workflows.config import Paths, compose_config
    from workflows.tracking import resolve_tracking_uri

    cfg = compose_config(list(args.get("overrides", [])))
    validate(cfg, "serve")
    tracking_uri = resolve_tracking_uri(cfg.tracking, Paths.of(cfg).output_dir)
    return application(deployed_of(cfg.serve, tracking_uri))


def deployed_of(s: ServeConfig, tracking_uri: str) -> Deployed:
    """The settings the replicas get: the model resolved, the token read from `serve.token_env`
    (only its digest travels)."""
    token = None
    if s.token_env:
        token = os.environ.get(s.token_env)
        if not token:
            raise ValueError(f"serve.token_env={s.token_env}: the environment variable {s.token_env} is not set "
                             "(or empty): export the token there, or drop serve.token_env")
    model = resolve_model(s.model, tracking_uri, "serve.model")
    return Deployed(s, model, tracking_uri, token_digest(token) if token else None)


# -- the registry follower -------------------------------------------------------------------


# Its requests are the replicas' waits for a change: none is worth draining when it stops.
@serve.deployment(name="ModelFollower", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=10_000, graceful_shutdown_timeout_s=1)
class ModelFollower:
    async def __init__(self, deployed: Deployed):
        self.deployed = deployed
        self.current = deployed.model
        self.changed = asyncio.Event()
        self.totals: Counter = Counter()
        self.latencies_ms: list[float] = []
        self.batch_sizes: Counter = Counter()
        self.versions: list[str] = [deployed.model.version or deployed.model.uri]
        every = deployed.serve.follow_every_s
        if every > 0 and ModelURI.parse(deployed.serve.model).alias:
            # A restarted follower resolves again: it must not hand out the deploy-time version.
            await self._resolve()
            self._task = asyncio.get_running_loop().create_task(self._follow(every))

    async def _resolve(self) -> None:
        d = self.deployed
        try:
            model = await asyncio.to_thread(resolve_model, d.serve.model, d.tracking_uri, "serve.model")
        except Exception as e:  # noqa: BLE001 - the registry is away or the alias gone: keep serving
            log.warning("cannot resolve %s (%s): still serving %s", d.serve.model, e, self.current.uri)
            return
        if model.uri != self.current.uri:
            log.info("%s moved: %s -> %s", d.serve.model, self.current.uri, model.uri)
            self.current = model
            self.versions.append(model.version or model.uri)
            self.changed.set()
            self.changed = asyncio.Event()

    async def _follow(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            await self._resolve()

    async def model(self, known_uri: str | None = None, timeout_s: float = 0.0) -> ResolvedModel:
        """The version to serve; with `known_uri`, once it differs from that or after `timeout_s`."""
        if known_uri == self.current.uri and timeout_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout_s)
        return self.current

    def report(self, counts: dict[str, int], latencies_ms: list[float], batch_sizes: dict[int, int]) -> None:
        self.totals.update(counts)
        self.latencies_ms = (self.latencies_ms + latencies_ms)[-LATENCIES_KEPT:]
        self.batch_sizes.update(batch_sizes)

    def stats(self) -> dict[str, Any]:
        """Requests by status class, latency percentiles (ms, the newest LATENCIES_KEPT
        requests), batch sizes, and the versions served in order."""
        out: dict[str, Any] = {"requests": sum(self.totals.values()), **dict(self.totals),
                               "versions": list(self.versions)}
        if self.latencies_ms:
            p50, p95, p99 = np.percentile(self.latencies_ms, [50, 95, 99])
            out.update(latency_p50_ms=float(p50), latency_p95_ms=float(p95), latency_p99_ms=float(p99))
        if self.batch_sizes:
            n = sum(self.batch_sizes.values())
            out.update(batches=n, batch_size_max=max(self.batch_sizes),
                       batch_size_mean=sum(k * v for k, v in self.batch_sizes.items()) / n)
        return out


# -- the model replicas ----------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """A loaded model and what its rows say about it."""

    model: Any  # MaskRCNN
    labels: Any  # CategoryMap
    uri: str
    version: str | None


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


async def _image_of(request: Request, body: bytes, limit: int) -> tuple[bytes, str | None]:
    """The image bytes of a /segment request and the upload's file name (None for raw bytes)."""
    if not body:
        raise RequestError(400, "empty body: send the image's bytes (curl --data-binary @image.jpg) or a "
                                "multipart upload (curl -F file=@image.jpg)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return body, None

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=limit)
    except Exception as e:  # noqa: BLE001 - a malformed multipart body
        raise RequestError(400, f"cannot read the multipart body: {e}") from None
    for value in form.values():
        if hasattr(value, "read"):
            return await value.read(), value.filename
    raise RequestError(400, "the multipart body holds no file: upload one (curl -F file=@image.jpg)")


def _dataframe_images(body: bytes) -> tuple[list[tuple[bytes, str]], dict[str, Any]]:
    """MLflow's scoring JSON -> ([(image bytes, name for messages)], params)."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise RequestError(400, f"the body is not JSON ({e}): send {{\"dataframe_split\": {{\"columns\": "
                                "[\"image\"], \"data\": [[BASE64]]}}}") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "expected a JSON object with dataframe_split, dataframe_records or inputs")
    params = doc.get("params") or {}
    if "dataframe_split" in doc:
        split = doc["dataframe_split"] or {}
        columns = split.get("columns", [])
        records = [dict(zip(columns, row)) for row in split.get("data", [])]
    elif "dataframe_records" in doc or "inputs" in doc:
        records = doc.get("dataframe_records", doc.get("inputs"))
        if isinstance(records, dict):  # inputs as columns
            records = [dict(zip(records, row)) for row in zip(*records.values())]
    else:
        raise RequestError(400, f"expected dataframe_split, dataframe_records or inputs, got keys {sorted(doc)}")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise RequestError(400, "the DataFrame's rows must be objects with an `image` column")
    images = []
    for i, record in enumerate(records):
        if "path" in record and "image" not in record:
            raise RequestError(400, f"row {i}: the server reads no files: send the image's bytes in `image` (base64)")
        try:
            images.append((base64.b64decode(record.get("image") or "", validate=True), f"row {i}"))
        except (binascii.Error, TypeError, ValueError):
            raise RequestError(400, f"row {i}: `image` is not base64") from None
    if not images:
        raise RequestError(400, "no rows: send at least one image")
    return images, params


# Serve pickles the deployment class when it is decorated: what its methods call is defined above.
api = FastAPI(title="mrcnn-serve", description="Mask R-CNN instance segmentation (Ray Serve)")


@serve.deployment(name="Segmenter")
@serve.ingress(api)
class Segmenter:
    async def __init__(self, deployed: Deployed, follower: DeploymentHandle):
        import torch

        from workflows.runtime.allocator import reuse_large_blocks

        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a replica's log, not a terminal
        s = deployed.serve
        self.deployed, self.s, self.follower = deployed, s, follower
        # One thread runs the model, batch after batch, with serve.torch_threads threads of its own:
        # OpenMP's thread count is per calling thread, and Ray sets the process's to num_cpus.
        threads = s.torch_threads or max(1, int(s.num_cpus))
        self.predictor = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        reuse_large_blocks()
        self.device = torch.device("cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.limit = int(s.max_body_mb * 2**20)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.counts: Counter = Counter()
        self.latencies_ms: list[float] = []
        self.batch_sizes: Counter = Counter()
        self.predict_batch.set_max_batch_size(s.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.served = await asyncio.to_thread(self._load, await follower.model.remote())
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._report())]
        if s.follow_every_s > 0 and ModelURI.parse(s.model).alias:
            self._tasks.append(loop.create_task(self._follow()))

    def _load(self, model: ResolvedModel) -> Served:
        from workflows.logged_model import load_model

        loaded = load_model(model.uri, self.deployed.tracking_uri)
        loaded.model.set_precision(self.s.precision).eval().to(self.device)
        return Served(loaded.model, loaded.labels, model.uri, model.version)

    async def _follow(self) -> None:
        while True:
            try:
                model = await self.follower.model.remote(self.served.uri, LONG_POLL_S)
                if model.uri != self.served.uri:
                    served = await asyncio.to_thread(self._load, model)  # beside the one serving
                    self.served = served  # batches already running keep the model they took
                    log.info("serving %s", model.uri)
            except Exception as e:  # noqa: BLE001 - a failed load or a restarting follower: retry later
                log.warning("following the model: %s", e)
                await asyncio.sleep(self.s.follow_every_s)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            if not self.counts:
                continue
            counts, latencies, sizes = dict(self.counts), self.latencies_ms, dict(self.batch_sizes)
            self.counts, self.latencies_ms, self.batch_sizes = Counter(), [], Counter()
            try:
                await self.follower.report.remote(counts, latencies, sizes)
            except Exception as e:  # noqa: BLE001 - the counts are lost, the serving goes on
                log.warning("reporting request counts: %s", e)

    # -- batching ------------------------------------------------------------------------------

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # set from serve.* in __init__
    async def predict_batch(self, items: list[tuple[bytes, str, float, int]]) -> list[tuple[dict, Served]]:
        """items: (encoded image, name for messages, score threshold, max detections) of
        concurrent requests -> (row, the model that produced it) each: decoded and predicted
        together in the model's thread (grouped by their limits); an image that cannot be decoded
        gets its error row."""
        served = self.served  # one model for the whole batch, even if a swap comes meanwhile
        self.batch_sizes[len(items)] += 1
        rows = await asyncio.get_running_loop().run_in_executor(self.predictor, self._predict, served, items)
        return [(row, served) for row in rows]

    def _predict(self, served: Served, items: list[tuple[bytes, str, float, int]]) -> list[dict]:
        from mrcnn.segment import decode_or_error, segment_decoded

        decoded = [decode_or_error(data, name, self.s.max_pixels) for data, name, _, _ in items]
        rows: list[dict | None] = [None] * len(items)
        groups: dict[tuple[float, int], list[int]] = {}
        for i, (_, _, threshold, limit) in enumerate(items):
            groups.setdefault((threshold, limit), []).append(i)
        for (threshold, limit), indices in groups.items():
            served.model.set_detection_limits(threshold, limit)
            for i, row in zip(indices, segment_decoded(served.model, [decoded[i] for i in indices], served.labels,
                                                       self.device)):
                rows[i] = row
        return rows

    # -- requests ------------------------------------------------------------------------------

    def _check_token(self, request: Request) -> None:
        want = self.deployed.token_sha256
        if want is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_digest(token.strip()), want):
            raise RequestError(401, "missing or wrong bearer token: send `Authorization: Bearer TOKEN`",
                               {"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limit:
            raise RequestError(413, f"the body of {int(length)} bytes is over serve.max_body_mb={self.s.max_body_mb:g}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limit:
                raise RequestError(413, f"the body is over serve.max_body_mb={self.s.max_body_mb:g}")
            chunks.append(chunk)
        return b"".join(chunks)

    def _limits(self, score_threshold: float | None, max_detections: int | None) -> tuple[float, int]:
        threshold = self.s.score_threshold if score_threshold is None else float(score_threshold)
        limit = self.s.max_detections if max_detections is None else int(max_detections)
        if not 0 <= threshold <= 1 or limit <= 0:
            raise RequestError(400, f"score_threshold={threshold} must be in [0, 1] and max_detections={limit} > 0")
        return threshold, limit

    def _respond(self, started: float, status: int, body: dict[str, Any], served: Served | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
        served = served or self.served
        headers = {**(headers or {}), VERSION_HEADER: served.version or "", "X-Model-URI": served.uri,
                   "X-Replica": self.replica}
        self.counts[f"{status // 100}xx"] += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)
        return JSONResponse(body, status_code=status, headers=headers)

    def _refuse(self, started: float, e: RequestError) -> JSONResponse:
        return self._respond(started, e.status, {"error": str(e)}, headers=e.headers)

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Unauthenticated: for load balancers and Kubernetes probes."""
        return JSONResponse({"status": "ok"}, headers={VERSION_HEADER: self.served.version or ""})

    @api.get("/version")
    async def version(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            self._check_token(request)
        except RequestError as e:
            return self._refuse(started, e)
        m = self.served
        name = self.deployed.model.name
        return self._respond(started, 200, {"model": self.s.model, "name": name, "version": m.version, "uri": m.uri})

    @api.post("/segment")
    async def segment(self, request: Request, score_threshold: float | None = None,
                      max_detections: int | None = None) -> JSONResponse:
        """Raw image bytes, or a multipart upload's first file -> one row as `mrcnn-infer`
        writes it (`path`: the upload's file name). 400 with an error row for an image that
        cannot be decoded or an empty body."""
        started = time.perf_counter()
        try:
            self._check_token(request)
            limits = self._limits(score_threshold, max_detections)
            body = await self._body(request)
            data, name = await _image_of(request, body, self.limit)
        except RequestError as e:
            return self._refuse(started, e)
        row, served = await self.predict_batch((data, name or "(request body)", *limits))
        row = {"path": name, **row, "model": served.uri, "model_version": served.version}
        return self._respond(started, 400 if row["error"] else 200, row, served)

    @api.post("/invocations")
    async def invocations(self, request: Request) -> JSONResponse:
        """The JSON `mlflow models serve` takes for this model: a DataFrame (`dataframe_split`,
        `dataframe_records` or `inputs`) with an `image` column of base64-encoded bytes, and
        `params` (`score_threshold`, `max_detections`) -> {"predictions": [one row per image]}."""
        started = time.perf_counter()
        try:
            self._check_token(request)
            images, params = _dataframe_images(await self._body(request))
            limits = self._limits(params.get("score_threshold"), params.get("max_detections"))
        except RequestError as e:
            return self._refuse(started, e)
        results = await asyncio.gather(*(self.predict_batch((data, name, *limits)) for data, name in images))
        # The header names the newest version used: rows predicted before a swap are the old one's.
        return self._respond(started, 200, {"predictions": [row for row, _ in results]}, results[-1][1])
