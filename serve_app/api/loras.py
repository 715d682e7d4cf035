"""Which LoRA adapters a request asks for: `model: "<model>:<adapter>"` (one adapter at its
default scale: works from any unmodified OpenAI client) and `extra_body.loras` (up to 4 stacked,
with scales), checked against the operator's catalog. Every refusal is raised here, naming the
field: an unknown adapter in the model id is the model that does not exist (404), elsewhere a
400 naming `loras[i].name`."""

from __future__ import annotations

from serve_app.api.protocol import MAX_LORAS, ImageRequest
from serve_app.config import ModelConfig, valid_lora_name
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.job import LoraChoice
from serve_app.lora_catalog import LoraCatalog


def lora_choices(request: ImageRequest, model: ModelConfig, catalog: LoraCatalog) -> tuple[LoraChoice, ...]:
    """The adapters, in order: the model id's first, then `loras`. `model` is the request's base
    model (its id's part before ":")."""
    _, colon, adapter = request.model.partition(":")
    if colon and not valid_lora_name(adapter):  # never a path: no "/", no ".."
        raise InvalidRequestError(f"'{adapter}' is not an adapter name (letters, digits, '.', '_', '-').",
                                  param="model")
    asked = [(adapter, None, "model")] if colon else []
    asked += [(ref.name, ref.scale, f"loras[{i}].name") for i, ref in enumerate(request.loras or [])]
    if not asked:
        return ()
    if not catalog.supports(model.id):
        if colon:
            raise ModelNotFoundError(request.model)
        raise InvalidRequestError(f"Model '{model.id}' ({model.family}, batching policy "
                                  f"{model.batching.policy}) does not take LoRA adapters.", param="loras")
    if len(asked) > MAX_LORAS:
        raise InvalidRequestError(f"At most {MAX_LORAS} LoRA adapters per request (with the one the model id "
                                  "names).", param="loras")
    choices: list[LoraChoice] = []
    for name, scale, param in asked:
        entry = catalog.get(model.id, name)
        if entry is None:
            if param == "model":
                raise ModelNotFoundError(request.model)
            raise InvalidRequestError(f"Model '{model.id}' has no LoRA adapter '{name}' (GET /v1/models lists "
                                      "them).", param=param, code="lora_not_found")
        if any(c.name == name for c in choices):
            raise InvalidRequestError(f"LoRA adapter '{name}' is asked for twice.", param=param)
        choices.append(LoraChoice(name, entry.source.scale if scale is None else scale, param))
    return tuple(choices)
