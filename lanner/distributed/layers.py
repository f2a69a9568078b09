"""A rank's shard of LlamaForCausalLM made tensor-parallel: the row-parallel linears' outputs all-reduced, the
vocabulary-parallel embedding and LM head."""
import torch
from torch import nn

from lanner.distributed.collectives import Collectives
from lanner.distributed.shards import ShardPlan


class VocabParallelEmbedding(nn.Module):
    """Each rank looks up the ids in its rows of the vocabulary (zeros for ids it does not hold); the
    all-reduce then sums one real row and zeros per token, which is exact."""

    def __init__(self, shard: nn.Module, vocab: range, comm: Collectives):
        super().__init__()
        self.shard, self.start, self.rows, self.comm = shard, vocab.start, len(vocab), comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        x = self.shard(local.masked_fill(outside, 0))
        return self.comm.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0).contiguous())


class VocabParallelHead(nn.Module):
    """Each rank's logits of its vocabulary rows, gathered side by side on rank 0 (which samples)."""

    def __init__(self, shard: nn.Module, widths: list[int], comm: Collectives):
        super().__init__()
        self.shard, self.widths, self.comm = shard, widths, comm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.comm.gather_columns(self.shard(hidden), self.widths)


def all_reduce_output(comm: Collectives):
    """A forward hook summing a row-parallel linear's partial outputs (LoRA deltas included) over ranks."""
    def hook(module, args, output):
        return comm.all_reduce(output.contiguous())
    return hook


def parallelize(model, plans: list[ShardPlan], comm: Collectives) -> None:
    """Make a rank's shard (built with plans[rank].local_config) compute its part of the full model."""
    plan = plans[comm.rank]
    for layer in model.layers:
        layer.self_attn.o_proj.register_forward_hook(all_reduce_output(comm))
        layer.mlp.down_proj.register_forward_hook(all_reduce_output(comm))
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, plan.vocab, comm)
    model.lm_head = VocabParallelHead(model.lm_head, [len(p.vocab) for p in plans], comm)
    model.decode_step = None   # it runs every layer in one C call, with no all-reduce between them
