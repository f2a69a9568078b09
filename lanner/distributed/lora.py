"""Adapters on tensor-parallel ranks: each linear's slots hold the part of the adapter its shard needs.

A column-parallel linear (qkv, gate_up) keeps B's rows (and IA3 output scales) of the outputs it holds; a
row-parallel one (o, down) keeps A's columns (and IA3 input scales) of the inputs it reads, so its partial
delta (x_r A_r^T) B^T sums over ranks to x A^T B^T in the all-reduce that sums the base outputs.
Rank 0's LoRAManager decides the slots; each step it names the adapter in every slot the batch uses, and a
worker's SlotMirror loads and writes the ones it does not hold yet."""
import torch

from lanner.distributed.shards import ShardPlan
from lanner.lora.adapter import LoRARequest, read_config
from lanner.lora.manager import LoRAManager
from lanner.lora.ops import LoRAWeights

COLUMN_PARALLEL = ("self_attn.qkv_proj", "mlp.gate_up_proj")
# kinds whose state is laid out by full heads outside the linears: not sharded yet
UNSHARDED_KINDS = {"PREFIX_TUNING": "prefix tuning", "ADAPTION_PROMPT": "LLaMA-Adapter"}


class ShardedLoRAWeights(LoRAWeights):
    """One linear's slots on one rank, written from the full adapter's pairs and vectors. outputs / inputs: the
    full linear's output rows / input columns this rank holds, in local order (None: all of them)."""

    def __init__(self, like: LoRAWeights, outputs: torch.Tensor | None, inputs: torch.Tensor | None):
        slots, rank, d_in = like.a.shape
        super().__init__(like.manager, slots - 1, rank, d_in, like.b.shape[1], like.a.dtype)
        self.outputs, self.inputs = outputs, inputs

    def write(self, slot: int, row: int, a: torch.Tensor, b: torch.Tensor, out_offset: int) -> None:
        r = a.shape[0]
        self.a[slot, row:row + r] = self.local_inputs(a).to(self.a.dtype)
        local, source = self.local_outputs(out_offset, b.shape[0])
        self.b[slot, local, row:row + r] = b[source].to(self.b.dtype)

    def write_output_scale(self, slot: int, vector: torch.Tensor, cols: slice) -> None:
        local, source = self.local_outputs(cols.start, cols.stop - cols.start)
        self.output_scales.setdefault(slot, torch.ones(self.b.shape[1]))[local] = vector[source]

    def write_input_scale(self, slot: int, vector: torch.Tensor) -> None:
        self.input_scales[slot] = self.local_inputs(vector)

    def local_inputs(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.inputs is None else t[..., self.inputs]

    def local_outputs(self, start: int, count: int):
        """(local rows, rows of the written block) for a block written at full rows start..start+count."""
        if self.outputs is None:
            return slice(start, start + count), slice(None)
        local = ((self.outputs >= start) & (self.outputs < start + count)).nonzero().squeeze(1)
        return local, self.outputs[local] - start


class ShardedLoRAManager(LoRAManager):
    """LoRAManager over a rank's shard: adapters validated against the full model, slots sharded."""

    def __init__(self, model, cfg, plan: ShardPlan, max_loras: int, max_lora_rank: int, max_cpu_loras: int | None):
        super().__init__(model, cfg, max_loras, max_lora_rank, max_cpu_loras)
        index = {name: torch.cat([torch.arange(r.start, r.stop) for r in ranges])
                 for name, ranges in plan.fused_rows(cfg).items()}
        for (layer, name), weights in list(self.weights.items()):
            column = name in COLUMN_PARALLEL
            sharded = ShardedLoRAWeights(weights, index[name] if column else None, None if column else index[name])
            model.layers[layer].get_submodule(name).lora = self.weights[(layer, name)] = sharded

    def add(self, request: LoRARequest) -> None:
        if request.lora_int_id not in self.requests:
            kind = read_config(request.lora_path).get("peft_type")
            if kind in UNSHARDED_KINDS:
                raise ValueError(f"adapter {request.lora_name!r} is a {UNSHARDED_KINDS[kind]} adapter, which is not "
                                 f"served with tensor parallelism; use tensor_parallel_size=1 for it")
        super().add(request)

    def step_slots(self):
        """What a worker needs to mirror this step's slots: (batch, {slot: request}), or None without adapters."""
        if self.batch is None:
            return None
        used = {slot for slot, _ in self.batch}
        return self.batch, {slot: self.requests[i] for i, slot in self.slot_of.items() if slot in used}


class SlotMirror:
    """A worker's slots kept equal to rank 0's: adapters are loaded and written when a step first names them."""

    def __init__(self, manager: ShardedLoRAManager):
        self.manager, self.held = manager, {}

    def apply(self, step) -> None:
        if step is None:
            self.manager.batch = None
            return
        batch, requests = step
        for slot, request in requests.items():
            if self.held.get(slot) != request:
                self.load(slot, request)
        self.manager.batch = batch

    def load(self, slot: int, request: LoRARequest) -> None:
        known = self.manager.requests.get(request.lora_int_id)
        if known is not None and known != request:   # rank 0 removed the id and reused it for other files
            self.manager.remove(request.lora_int_id)
        self.manager.add(request)
        self.manager.write_slot(slot, self.manager.get(request))
        self.held[slot] = request
