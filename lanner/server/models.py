"""Served model names -> lora_request: the base model (None) and every loaded LoRA adapter."""
import itertools
import time

from lanner.server.errors import APIError

LORA_DISABLED = ("LoRA is not enabled: start the server with --lora NAME=PATH (or enable_lora) to serve "
                 "adapters; /v1/load_lora_adapter and /v1/unload_lora_adapter need it too")


class ModelRegistry:
    """validate(LoRARequest) checks an adapter against the base model (raises ValueError); None: no LoRA."""

    def __init__(self, base_name: str, max_model_len: int, validate=None, input_modalities=("text",)):
        self.base_name, self.max_model_len, self.validate = base_name, max_model_len, validate
        self.input_modalities = list(input_modalities)   # in /v1/models: ["text", "image"] for a VLM
        self.models: dict[str, object] = {base_name: None}     # name -> lora_request (None: the base model)
        self.created = int(time.time())
        self.ids = itertools.count(1)

    @property
    def lora_enabled(self) -> bool:
        return self.validate is not None

    def resolve(self, name: str | None):
        """The lora_request for a request's `model` (absent or empty: the base model)."""
        if not name:
            return None
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; served: {sorted(self.models)}", "model",
                           "model_not_found")
        return self.models[name]

    def load(self, name: str, path: str) -> None:
        """Validate the adapter now (a bad one is a 400 naming the problem); the engine loads it on first use."""
        from lanner.lora.adapter import LoRARequest
        if not self.lora_enabled:
            raise APIError(400, LORA_DISABLED, "lora_name", "lora_not_enabled")
        if not name or name in self.models:
            raise APIError(400, f"an adapter or model named {name!r} is already served", "lora_name")
        request = LoRARequest(name, next(self.ids), path)
        try:
            self.validate(request)
        except ValueError as e:
            raise APIError(400, str(e), "lora_path") from e
        self.models[name] = request

    def unload(self, name: str) -> None:
        if not self.lora_enabled:
            raise APIError(400, LORA_DISABLED, "lora_name", "lora_not_enabled")
        if name == self.base_name:
            raise APIError(400, "the base model cannot be unloaded", "lora_name")
        if name not in self.models:
            raise APIError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found")
        del self.models[name]

    def cards(self) -> list[dict]:
        return [{"id": name, "object": "model", "created": self.created, "owned_by": "lanner",
                 "root": name if lora is None else getattr(lora, "lora_path", name),
                 "parent": None if lora is None else self.base_name, "max_model_len": self.max_model_len,
                 "input_modalities": self.input_modalities}
                for name, lora in self.models.items()]
