"""Served model names -> lora_request: the base model (None) and, once the engine has LoRA, its adapters."""
import time

from lanner.server.errors import APIError

LORA_DISABLED = ("LoRA is not enabled: this engine does not serve LoRA adapters yet, so --lora, "
                 "/v1/load_lora_adapter and /v1/unload_lora_adapter are unavailable")


class ModelRegistry:
    def __init__(self, base_name: str, max_model_len: int, lora_enabled: bool = False):
        self.base_name, self.max_model_len, self.lora_enabled = base_name, max_model_len, lora_enabled
        self.models: dict[str, object] = {base_name: None}     # name -> lora_request (None: the base model)
        self.created = int(time.time())

    def resolve(self, name: str | None):
        """The lora_request for a request's `model` (absent or empty: the base model)."""
        if not name:
            return None
        if name not in self.models:
            raise APIError(404, f"the model {name!r} does not exist; served: {sorted(self.models)}", "model",
                           "model_not_found")
        return self.models[name]

    def load(self, name: str, path: str) -> None:
        if not self.lora_enabled:
            raise APIError(400, LORA_DISABLED, "lora_name", "lora_not_enabled")
        raise NotImplementedError("adapter loading lands with the engine's LoRA support")

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
                 "parent": None if lora is None else self.base_name, "max_model_len": self.max_model_len}
                for name, lora in self.models.items()]
