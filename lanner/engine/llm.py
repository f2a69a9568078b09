"""LLM: the offline, vLLM-shaped API over LLMEngine."""
from dataclasses import fields

from tqdm import tqdm

from lanner.config import EngineConfig
from lanner.engine.engine import LLMEngine
from lanner.engine.multimodal import chat_parts, template_takes_parts
from lanner.engine.outputs import RequestOutput
from lanner.sampling_params import SamplingParams

Prompt = str | list[int] | dict   # dict: {"prompt": text, "multi_modal_data": {"image": ...}}, as vLLM's


class LLM:
    """LLM(model=None, dtype="auto", max_model_len=None, ...): None means the default model."""

    def __init__(self, model: str | None = None, **kwargs):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown LLM option(s) {sorted(unknown)}; known: {sorted(known - {'extra'})}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request=None) -> list[RequestOutput]:
        single = isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else prompts
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
        if len(params) != len(prompts) or len(loras) != len(prompts):
            raise ValueError("give one SamplingParams / lora_request, or one per prompt")
        ids = self.add_all(prompts, params, loras)
        return self.run_to_completion(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = True,
             lora_request=None) -> list[RequestOutput]:
        """messages in OpenAI's shape; content may be a list of text and image_url / image parts."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.chat_prompt(c) for c in conversations], sampling_params, use_tqdm, lora_request)

    def chat_prompt(self, messages: list[dict]) -> str | dict:
        vision = self.engine.runner.vision
        takes_parts = template_takes_parts(self.tokenizer.chat_template)
        messages, images = chat_parts(messages, takes_parts, vision.processor.image_token if vision else "<image>")
        text = self.tokenizer.apply_chat_template(messages)
        return {"prompt": text, "multi_modal_data": {"image": images}} if images else text

    def add_all(self, prompts, params, loras) -> list[str]:
        """Add every request, or none: a bad prompt aborts the ones already added (no leaked blocks)."""
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(self.engine.add_request(prompt, p, lora_request=lora))
        except Exception:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def run_to_completion(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm or len(ids) < 2)
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None, lora_request=None):
        """Yield the text of one request as it is generated (whole characters, never part of a stop string)."""
        request_id = self.engine.add_request(prompt, sampling_params, lora_request=lora_request)
        holdback = max((len(s) - 1 for s in (sampling_params.stop if sampling_params else [])), default=0)
        emitted = 0
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id != request_id:
                        continue
                    text = out.outputs[0].text
                    visible = len(text) if out.finished else len(text) - holdback
                    if visible > emitted:
                        yield text[emitted:visible]
                        emitted = visible
                    if out.finished:
                        return
        finally:
            self.engine.abort_request(request_id)   # no-op when finished; frees blocks if the caller stops early
