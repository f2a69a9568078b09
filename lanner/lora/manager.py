"""Adapter slots: validated adapters (LoRA, IA3 or LLaMA-Adapter) in a CPU-side LRU, up to max_loras of them active
in a batch.
Prefix-tuned adapters take no slot: their virtual tokens are pinned in the KV pool while they are loaded; nor do
prompt-tuned ones: their virtual tokens' embeddings go with each of their requests."""
from collections import OrderedDict

import torch

from lanner.config import ModelConfig
from lanner.lora.adaption import AdaptionPromptAdapter, AdaptionSlots
from lanner.lora.adapter import (FUSED, SUBMODULES, LoRAAdapter, LoRARequest, adapter_digest, load_adapter,
                                 output_slices)
from lanner.lora.ia3 import IA3Adapter
from lanner.lora.ops import LoRAWeights
from lanner.lora.prefix import PrefixAdapter, PrefixPool
from lanner.lora.prompt import PromptAdapter


class LoRAManager:
    def __init__(self, model, cfg: ModelConfig, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None):
        if max_loras < 1 or max_lora_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_lora_rank}")
        self.cfg, self.max_loras, self.max_rank = cfg, max_loras, max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.requests: dict[int, LoRARequest] = {}
        # validated adapters, LRU
        self.loaded: OrderedDict[int, LoRAAdapter | IA3Adapter | PrefixAdapter | PromptAdapter
                                 | AdaptionPromptAdapter] = OrderedDict()
        self.digests: dict[int, str] = {}                            # adapter id -> adapter_digest of its files
        self.slot_of: OrderedDict[int, int] = OrderedDict()          # adapter id -> slot (1-based), LRU
        self.weights: dict[tuple[int, str], LoRAWeights] = {}
        self.batch = None                                            # per-step token -> slot segments
        self.linear_slots: set[int] = set()                          # slots whose adapter acts on linears only
        self.prefix_pool: PrefixPool | None = None                   # set by the engine once the KV pool exists
        for i, layer in enumerate(model.layers):
            for fused, subs in FUSED.items():
                linear = layer.get_submodule(fused)
                w = LoRAWeights(self, max_loras, max_lora_rank * len(subs), linear.in_features,
                                linear.out_features, linear.weight.dtype)
                linear.lora = self.weights[(i, fused)] = w
        self.adaptions = [AdaptionSlots(self, layer.self_attn) for layer in model.layers]
        for layer, slots in zip(model.layers, self.adaptions):
            layer.self_attn.adaption = slots

    # ---- registry ---------------------------------------------------------------------------------
    def add(self, request: LoRARequest) -> None:
        """Load and validate an adapter (raises ValueError naming the problem); no-op if known."""
        known = self.requests.get(request.lora_int_id)
        if known is not None and known.lora_path != request.lora_path:
            raise ValueError(f"lora_int_id {request.lora_int_id} is already used by adapter {known.lora_name!r}")
        self.get(request)
        self.requests[request.lora_int_id] = request

    def get(self, request: LoRARequest) -> LoRAAdapter | IA3Adapter | PrefixAdapter | PromptAdapter \
            | AdaptionPromptAdapter:
        adapter = self.loaded.get(request.lora_int_id)
        if adapter is None:   # (re)loaded from its files: their digest is what its KV blocks are cached under
            adapter = load_adapter(request, self.cfg, self.max_rank)
            self.digests[request.lora_int_id] = adapter_digest(request.lora_path)
            if isinstance(adapter, PrefixAdapter):
                self.prefix_pool.pin(adapter)
            self.loaded[request.lora_int_id] = adapter
            while len(self.loaded) > self.max_cpu_loras:   # slots keep their own copy; reload on demand
                self.unload(self.loaded.popitem(last=False)[1])
        self.loaded.move_to_end(request.lora_int_id)
        return adapter

    def pinned_prefix(self, lora_id: int):
        """A loaded prefix adapter's blocks in the KV pool (kv_cache.PinnedPrefix); None for other kinds."""
        adapter = self.loaded.get(lora_id)
        return adapter.pinned if isinstance(adapter, PrefixAdapter) else None

    def prompt_adapter(self, lora_id: int) -> PromptAdapter | None:
        """A loaded prompt-tuned (or P-tuned) adapter, whose virtual tokens' embeddings a request carries; None
        for other kinds."""
        adapter = self.loaded.get(lora_id)
        return adapter if isinstance(adapter, PromptAdapter) else None

    def remove(self, lora_id: int) -> None:
        self.requests.pop(lora_id, None)
        self.digests.pop(lora_id, None)
        self.slot_of.pop(lora_id, None)
        if lora_id in self.loaded:
            self.unload(self.loaded.pop(lora_id))

    def unload(self, adapter) -> None:
        """Requests of an unloaded prefix adapter keep its blocks until they end (they hold them too)."""
        if isinstance(adapter, PrefixAdapter):
            self.prefix_pool.unpin(adapter)

    # ---- per step ---------------------------------------------------------------------------------
    def set_batch(self, token_lora_ids: list[int]) -> None:
        """Activate the step's adapters in slots and group token rows by slot."""
        ids = sorted(set(token_lora_ids) - {0})
        if not ids:
            self.batch = None
            return
        slots = {i: self.activate(i, keep=ids) for i in ids}
        rows = torch.tensor(token_lora_ids)
        self.batch = [(slots[i], None if len(ids) == 1 and (rows == i).all() else (rows == i).nonzero().squeeze(1))
                      for i in ids]

    def activate(self, lora_id: int, keep: list[int]) -> int:
        if lora_id in self.slot_of:
            self.slot_of.move_to_end(lora_id)
            return self.slot_of[lora_id]
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.max_loras + 1) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next(i for i in self.slot_of if i not in keep)
            slot = self.slot_of.pop(victim)
        adapter = self.get(self.requests[lora_id])
        self.write_slot(slot, adapter)
        self.slot_of[lora_id] = slot
        return slot

    def write_slot(self, slot: int, adapter: LoRAAdapter | IA3Adapter | AdaptionPromptAdapter) -> None:
        for w in self.weights.values():
            w.clear(slot)
        for slots in self.adaptions:
            slots.by_slot.pop(slot, None)
        self.linear_slots.discard(slot)
        if isinstance(adapter, IA3Adapter):
            self.write_ia3(slot, adapter)
        elif isinstance(adapter, AdaptionPromptAdapter):
            for layer, (prompt, gate) in adapter.prompts.items():
                self.adaptions[layer].write(slot, prompt, gate)
        else:
            self.write_lora(slot, adapter)
        if self.acts_on_linears(adapter):
            self.linear_slots.add(slot)

    def only_linear_adapters(self) -> bool:
        """Whether every adapter of the step's batch acts on linears only (LoRA, IA3): its rows then differ from base
        rows only inside each linear (what the one-call decode step applies)."""
        return all(slot in self.linear_slots for slot, _ in self.batch or ())

    @staticmethod
    def acts_on_linears(adapter) -> bool:
        """A LoRA or IA3 adapter (not LLaMA-Adapter's prompts, nor prefix or prompt tuning's virtual tokens)."""
        return isinstance(adapter, (LoRAAdapter, IA3Adapter))

    def linear_adapter(self, lora_id: int) -> bool:
        """Whether the adapter of this id is loaded and acts on linears only."""
        return self.acts_on_linears(self.loaded.get(lora_id))

    def write_lora(self, slot: int, adapter: LoRAAdapter) -> None:
        """Lay the adapter's pairs out block-diagonally over each fused linear's output slices."""
        rank, slices = adapter.max_rank, output_slices(self.cfg)
        for (layer, fused), w in self.weights.items():
            for i, sub in enumerate(FUSED[fused]):
                pair = adapter.weights.get((layer, sub))
                if pair is not None:
                    w.write(slot, i * rank, *pair, slices[sub].start)
            w.ranks[slot] = rank * len(FUSED[fused])

    def write_ia3(self, slot: int, adapter: IA3Adapter) -> None:
        """Each vector on its fused linear: over the module's output slice, or over the whole input."""
        slices = output_slices(self.cfg)
        for (layer, module), (vector, scales_input) in adapter.vectors.items():
            w = self.weights[(layer, SUBMODULES[module][0])]
            if scales_input:
                w.write_input_scale(slot, vector)
            else:
                w.write_output_scale(slot, vector, slices[module])
