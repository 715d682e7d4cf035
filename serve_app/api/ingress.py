"""`ImageIngress`: the one HTTP entry point. Parses and validates (protocol.py), checks the
API key, resolves presets (presets.py) and hands a `GenerationJob` to the model's
`ModelServer`. No torch here: the ingress stays light and never becomes the bottleneck."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api import idempotency, uploads
from serve_app.api.auth import ApiKeys
from serve_app.api.drain import DrainMiddleware, DrainState
from serve_app.api.edits import EditBody, read_edit, read_variation
from serve_app.api.idempotency import fingerprint, run_once
from serve_app.api.limits import BodyLimitMiddleware, decode_json_body
from serve_app.api.loras import lora_choices
from serve_app.api.openapi import EDITS_DOC, GENERATIONS_DOC, MODEL_DOC, MODELS_DOC, VARIATIONS_DOC, install_openapi
from serve_app.api.playground import mount_playground
from serve_app.api.presets import check_edit, check_generation, edit_schedule, resolve_job
from serve_app.api.protocol import ImageRequest, ImageVariationRequest, ModelCard, ModelList, parse_generate_request
from serve_app.api.responses import images_response, relay
from serve_app.config import AppConfig, ModelConfig
from serve_app.errors import (
    ArtServeError,
    GenerationError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)
from serve_app.job import GenerationJob, GenerationResult, LoraChoice
from serve_app.lora_catalog import LoraCatalog
from serve_app.metrics import IngressMetrics
from serve_app.readiness import ModelReadiness
from serve_app.storage import CONTENT_TYPES
from serve_app.storage.local import ROUTE_PREFIX, LocalImageStore

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 2
SMALL_BODY_BYTES = 64 * 1024  # routes that take no body (GETs, unknown paths)


def error_response(error: ArtServeError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status_code, headers=error.response_headers())


def _serve_request_id() -> str:
    from ray.serve.context import _get_serve_request_context

    return _get_serve_request_context().request_id


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (unit tests)
        return "-"


# A model replica that died or became unreachable mid-request: the request itself was fine
# and the model comes back (Serve restarts the replica), so "try again", never "our bug".
REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, ReplicaUnavailableError)


def _from_replica(exc: BaseException) -> ArtServeError:
    """Map what a `ModelServer` call raised to the error the client sees."""
    cause = getattr(exc, "cause", exc)  # Ray wraps replica exceptions in RayTaskError
    if isinstance(cause, ArtServeError):
        return cause
    if isinstance(exc, BackPressureError):
        retry_after_s = getattr(exc, "retry_after_s", None) or RETRY_AFTER_S
        return RateLimitError(
            "The model is at capacity; retry shortly.",
            headers={"Retry-After": str(math.ceil(retry_after_s))},
        )
    if isinstance(exc, DeploymentUnavailableError):
        return ServiceUnavailableError("The model is not available right now; try again later.")
    if isinstance(exc, REPLICA_LOST) or isinstance(cause, REPLICA_LOST):
        logger.warning("model replica lost mid-request: %s", type(exc).__name__)
        return ServiceUnavailableError(
            "The model replica serving this request was lost; try again.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    logger.error("model call failed: %r", exc)
    return GenerationError("Image generation failed.")


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready for its model."""

    model_id: str
    job: GenerationJob
    quality: str | None  # the request's, for the echo (None: the default)
    stream: bool


@serve.deployment
@serve.ingress()
class ImageIngress:
    def __init__(
        self,
        config: AppConfig,
        models: dict[str, ModelConfig],
        handles: dict[str, DeploymentHandle],
        idempotency: DeploymentHandle | None = None,
    ):
        self.config = config
        self.models = models
        self.handles = handles
        self.idempotency = idempotency
        self.keys = ApiKeys.from_env()
        self.metrics = IngressMetrics()
        self.readiness = ModelReadiness.for_models(models)
        if not self.keys:
            logger.warning("no API keys configured (ARTSERVE_API_KEYS): the API is open to anyone")
        self.local_store = (
            None
            if config.uses_gcs()
            else LocalImageStore(config.storage, url_ttl_s=config.url_ttl_s, public_url=config.public_url)
        )
        self._janitor: asyncio.Task | None = None
        self.drain = DrainState(config.drain_dir)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    @property
    def loras(self) -> LoraCatalog:
        """The LoRA adapters each model offers (its YAML's, and the files in loras_dir), made on first use."""
        if "_loras" not in self.__dict__:
            self._loras = LoraCatalog(self.config.loras_dir, self.models)
        return self._loras

    async def check_health(self) -> None:
        # Serve calls this every few seconds from the replica's loop: the janitor's start.
        if self.local_store is not None and self._janitor is None:
            self._janitor = asyncio.create_task(self._sweep_forever(self.local_store))

    async def _sweep_forever(self, store: LocalImageStore) -> None:
        while True:
            try:
                await asyncio.to_thread(store.sweep)
            except Exception:  # a janitor that dies would let the disk fill: log and go on
                logger.exception("janitor: sweeping %s failed", store.root)
            await asyncio.sleep(self.config.janitor_period_s)

    async def generate(
        self, body: Any, request_id: str, base_url: str, idempotency_key: str | None = None
    ) -> Response:
        model = body.get("model") if isinstance(body, dict) else None
        return await self._respond(model, lambda: self._prepare(body, request_id, base_url), idempotency_key,
                                   lambda: fingerprint(body))

    async def edit(
        self, body: EditBody, request_id: str, base_url: str, idempotency_key: str | None = None
    ) -> Response:
        """An edit or a variation (already read and validated as a request: edits.py)."""
        return await self._respond(body.request.model, lambda: self._prepare_edit(body, request_id, base_url),
                                   idempotency_key, lambda: body.fingerprint)

    async def _respond(self, model: Any, prepare: Callable[[], Awaitable[Prepared]], idempotency_key: str | None,
                       body_fingerprint: Callable[[], str]) -> Response:
        base = model.partition(":")[0] if isinstance(model, str) else None  # "<model>:<adapter>": its model
        model_tag = base if base in self.models else "-"
        try:
            prepared = await prepare()
            if prepared.stream:  # not replayable: an Idempotency-Key is ignored (README)
                response = await self._stream(prepared)
                self.metrics.response(model_tag, 200)
                return response
            if idempotency_key is None or self.idempotency is None:
                content, headers = await self._run(prepared)
            else:
                content, headers = await run_once(
                    self.idempotency, idempotency_key, body_fingerprint(), self.config.request_timeout_s,
                    lambda: self._run(prepared),
                )
        except ArtServeError as exc:
            self.metrics.response(model_tag, exc.status_code)
            raise
        self.metrics.response(model_tag, 200)
        return JSONResponse(content, headers=headers)

    def _model(self, model_id: Any) -> ModelConfig:
        model = self.models.get(model_id) if isinstance(model_id, str) else None
        if model is None:
            raise ModelNotFoundError(str(model_id))
        return model

    def _model_and_loras(self, request: ImageRequest) -> tuple[ModelConfig, tuple[LoraChoice, ...]]:
        """The request's model (its id's part before ":") and the LoRA adapters it asks for."""
        model = self._model(request.model.partition(":")[0])
        return model, lora_choices(request, model, self.loras)

    async def _prepare(self, body: Any, request_id: str, base_url: str) -> Prepared:
        request = parse_generate_request(body)
        model, loras = self._model_and_loras(request)
        check_generation(model)
        job = replace(resolve_job(request, model, request_id=request_id, base_url=base_url), loras=loras)
        logger.info(
            "request %s: model=%s n=%d size=%dx%d steps=%d loras=%s user=%s",
            request_id, model.id, job.n, job.width, job.height, job.num_inference_steps,
            [(c.name, c.scale) for c in loras], request.user,
        )
        return Prepared(model.id, job, request.quality, bool(request.stream))

    async def _prepare_edit(self, body: EditBody, request_id: str, base_url: str) -> Prepared:
        """Every check that needs no image first (nothing fetched for a refused request), then
        the images: headers (pixel bound), then the decode, off the event loop."""
        request = body.request
        model, loras = self._model_and_loras(request)
        check_edit(model, images=body.image_count, mask=body.has_mask, image_param=body.image_param)
        # The scalar fields, and a strength that runs at least one step: a 400 before fetching.
        steps = resolve_job(request, model, request_id=request_id, base_url=base_url).num_inference_steps
        steps, strength = edit_schedule(request, model, mask=body.has_mask, steps=steps)
        images, mask = await body.load()
        max_pixels = model.sizes.max_input_pixels()
        size = await asyncio.to_thread(uploads.input_size, images, max_pixels, model.reference_shape)
        job = resolve_job(request, model, request_id=request_id, base_url=base_url, input_size=size)
        edit = await asyncio.to_thread(uploads.prepare, images, mask, width=job.width, height=job.height,
                                       max_pixels=max_pixels, references=model.reference_edits)
        variation = isinstance(request, ImageVariationRequest)
        job = replace(job, images=edit.images, mask=edit.mask, image_tokens=edit.image_tokens,
                      num_inference_steps=steps, strength=strength, loras=loras,
                      preserve_unmasked=getattr(request, "preserve_unmasked", None) is not False,
                      event_prefix="image_generation" if variation else "image_edit")
        logger.info(
            "request %s: %s model=%s n=%d images=%d input=%dx%d size=%dx%d steps=%d strength=%s mask=%s user=%s",
            request_id, "variation" if variation else "edit", model.id, job.n, len(images), *size, job.width,
            job.height, job.num_inference_steps, job.strength, mask is not None, request.user,
        )
        return Prepared(model.id, job, request.quality, bool(request.stream))

    async def _check_ready(self, model_id: str) -> None:
        # Not in _prepare: an Idempotency-Key replay needs no model.
        refusal = await self.readiness.refusal(model_id)
        if refusal is not None:
            raise refusal

    async def _stream(self, prepared: Prepared) -> StreamingResponse:
        """Validation errors were plain JSON before this; from here on, events."""
        await self._check_ready(prepared.model_id)
        parts = self.handles[prepared.model_id].options(stream=True).generate_stream.remote(prepared.job)
        # The events carry no seed (OpenAI's schema): the header does, for the playground and tools.
        headers = {"Cache-Control": "no-cache", "x-artserve-seed": str(prepared.job.seeds[0])}
        # guard_stream: ended with a 503 event if the replica it waits for cannot come (lost, failed, no node).
        parts = self.readiness.guard_stream(prepared.model_id, parts)
        return StreamingResponse(relay(parts, prepared.job, prepared.quality, _from_replica),
                                 media_type="text/event-stream", headers=headers)

    async def _run(self, prepared: Prepared) -> tuple[dict[str, Any], dict[str, str]]:
        job = prepared.job
        await self._check_ready(prepared.model_id)
        response = self.handles[prepared.model_id].generate.remote(job)
        called = time.monotonic()
        try:
            # guard: released with a 503 if the replica it waits for cannot come (lost, failed, no node).
            result: GenerationResult = await asyncio.wait_for(self.readiness.guard(prepared.model_id, response),
                                                              self.config.request_timeout_s)
        except TimeoutError:
            response.cancel()
            raise ServiceUnavailableError("Image generation timed out; try again later.") from None
        except Exception as exc:
            raise _from_replica(exc) from None
        # The largest batch any of this request's denoising steps ran in: batching made visible.
        headers = {"x-artserve-batch-size": str(max(r.batch_size for r in result.images))}
        # Server-Timing (ms): the handle call (to the replica and back) and the replica's own parts.
        timings = {"handle": 1000 * (time.monotonic() - called), **result.timings_ms}
        headers["server-timing"] = ", ".join(f"{name};dur={ms:.1f}" for name, ms in timings.items())
        return images_response(job, prepared.quality, result), headers

    async def model_card(self, model: ModelConfig) -> ModelCard:
        status, running = await self.readiness.state(model.id)
        return ModelCard(
            status=status,
            running_replicas=running,
            id=model.id,
            created=model.created,
            owned_by=model.owned_by,
            family=model.family,
            sizes=model.sizes.allowed,
            size_rule=model.sizes.rule(),
            default_size=model.default_size,
            default_output_format=model.default_output_format,
            max_prompt_chars=model.max_prompt_chars,
            supports_negative_prompt=model.supports_negative_prompt,
            supports_generation=model.generations,
            supports_edits=model.edits.enabled,
            supports_inpainting=model.edits.enabled and model.edits.inpainting,
            max_input_images=model.edits.max_input_images if model.edits.enabled else 0,
        )

    async def adapter_cards(self, model: ModelConfig, name: str | None = None) -> list[ModelCard]:
        """The model's LoRA adapters as models of their own (`<model>:<adapter>`); one, by name."""
        if name is None:
            entries = self.loras.entries(model.id)
        else:
            entry = self.loras.get(model.id, name)  # looks again at once for a name not listed yet
            entries = {name: entry} if entry is not None else {}
        if not entries:
            return []
        card = await self.model_card(model)
        return [card.model_copy(update={"id": e.id, "created": e.created, "base_model": model.id,
                                        "lora_scale": e.source.scale, "description": e.source.description or None})
                for e in entries.values()]


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        return None
    return idempotency.scoped_key(request.headers.get("authorization"), idempotency.check_key(key))


def create_api(ingress: ImageIngress) -> FastAPI:
    api = FastAPI(title="ArtServe", version="0.1.0", docs_url=None, redoc_url=None)
    config = ingress.config
    upload_limit = config.max_upload_body_bytes or uploads.edit_body_limit(
        max((m.edits.max_input_images for m in ingress.models.values() if m.edits.enabled), default=1))
    limits = {"/v1/images/generations": config.max_json_body_bytes,
              "/v1/images/edits": upload_limit, "/v1/images/variations": upload_limit}

    def authorize(request: Request) -> None:
        ingress.keys.check(request.headers.get("authorization"))

    replica = _replica_id()

    @api.middleware("http")
    async def request_context(request: Request, call_next):
        # Serve's proxy takes `x-request-id` from the request (or makes one), returns it on
        # every response and tags its own log lines with it; we reuse the same id.
        request.state.request_id = _serve_request_id() or f"req_{secrets.token_hex(12)}"
        started = time.monotonic()
        try:
            response = await call_next(request)
            response.headers["x-artserve-replica"] = replica  # which ingress replica answered
            inner = response.headers.get("server-timing")
            ingress_ms = f"ingress;dur={1000 * (time.monotonic() - started):.1f}"
            response.headers["server-timing"] = f"{ingress_ms}, {inner}" if inner else ingress_ms
            return response
        except Exception:  # the last line of defence: never a bare 500 or a stack trace
            if await request.is_disconnected():  # the client left; Serve cancelled the work
                logger.info("request %s: client disconnected", request.state.request_id)
                return Response(status_code=499)
            logger.exception("request %s: unhandled error", request.state.request_id)
            return error_response(GenerationError("The server had an error processing your request."))

    @api.exception_handler(ArtServeError)
    async def _typed(request: Request, exc: ArtServeError) -> JSONResponse:
        if exc.status_code >= 500:  # 503s (loading, storage down) are expected: a warning
            level = logging.WARNING if exc.status_code == 503 else logging.ERROR
            logger.log(level, "request %s: %s %s", request.state.request_id, exc.status_code, exc.message)
        return error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _routing(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 405:
            return error_response(MethodNotAllowedError(f"Method not allowed: {where}."))
        return error_response(NotFoundError(f"Unknown request URL: {where}."))

    @api.post("/v1/images/generations", dependencies=[Depends(authorize)], openapi_extra=GENERATIONS_DOC)
    async def images_generations(request: Request) -> JSONResponse:
        body = decode_json_body(await request.body())  # 413 past the limit, while reading
        return await ingress.generate(body, request.state.request_id, str(request.base_url), _idempotency_key(request))

    @api.post("/v1/images/edits", dependencies=[Depends(authorize)], openapi_extra=EDITS_DOC)
    async def images_edits(request: Request) -> Response:
        body = await read_edit(request, config.edit_url_hosts)  # 413 past the limit, while reading
        return await ingress.edit(body, request.state.request_id, str(request.base_url), _idempotency_key(request))

    @api.post("/v1/images/variations", dependencies=[Depends(authorize)], openapi_extra=VARIATIONS_DOC)
    async def images_variations(request: Request) -> Response:
        body = await read_variation(request)
        return await ingress.edit(body, request.state.request_id, str(request.base_url), _idempotency_key(request))

    @api.get("/v1/models", dependencies=[Depends(authorize)], openapi_extra=MODELS_DOC)
    async def list_models() -> JSONResponse:
        cards = []
        for m in ingress.models.values():
            cards += [await ingress.model_card(m), *await ingress.adapter_cards(m)]
        return JSONResponse(ModelList(data=cards).model_dump(exclude_none=True))

    @api.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)], openapi_extra=MODEL_DOC)
    async def get_model(model_id: str) -> JSONResponse:
        base, colon, adapter = model_id.partition(":")  # "<model>:<adapter>": a LoRA adapter's card
        model = ingress.models.get(base)
        cards = [] if model is None else (
            await ingress.adapter_cards(model, adapter) if colon else [await ingress.model_card(model)])
        if not cards:
            raise ModelNotFoundError(model_id)
        return JSONResponse(cards[0].model_dump(exclude_none=True))

    # Signed links carry their own credential: no API key, so a plain GET works.
    @api.get(ROUTE_PREFIX + "{key:path}")
    async def image_file(key: str, expires: str | None = None, signature: str | None = None):
        if ingress.local_store is None:
            raise NotFoundError("Images are not served from this host.")
        path = ingress.local_store.open_signed(key, expires, signature)
        remaining_s = max(0, int(expires) - int(time.time()))  # type: ignore[arg-type]
        return FileResponse(
            path,
            media_type=CONTENT_TYPES[path.suffix.lstrip(".")],
            headers={"Cache-Control": f"private, max-age={remaining_s}"},
        )

    mount_playground(api)  # the page at `/` (no key needed to load it; its API calls carry one)
    # Outermost: a body over the route's limit is refused before anything else reads it.
    api.add_middleware(BodyLimitMiddleware, limit_for=lambda path: limits.get(path, SMALL_BODY_BYTES))
    install_openapi(api)
    # Outermost of all: while the host drains, a new POST is refused before anything reads it.
    api.add_middleware(DrainMiddleware, state=ingress.drain)
    return api
