"""lanner: a fast, readable LLM inference engine."""
from lanner.startup import collector_paused

with collector_paused(freeze=True):   # torch's import, mostly
    from lanner.config import EngineConfig
    from lanner.engine.llm import LLM
    from lanner.engine.outputs import CompletionOutput, RequestOutput
    from lanner.lora.adapter import LoRARequest
    from lanner.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "LoRARequest", "RequestOutput", "CompletionOutput", "EngineConfig"]
