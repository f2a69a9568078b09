"""Our Llama decoder as a plain causal LM over padded [B, L] batches, with one PEFT method's trainable part.

Serving runs the decoder on the paged KV cache; training reuses the same modules and weights (TrainModel walks
embed_tokens / layers / norm / lm_head with SDPA). Batches are right-padded, so a real token never attends to a pad
token under the causal mask; pad rows are never in the loss. The base is frozen (fp32, bf16, or its decoder linears
in NF4); a Method adds what PEFT's method adds, and only its parameters train:
    LoRA      y_part = x W_part^T + dropout(x) A^T B^T * scaling on the chosen PEFT modules' slices of a fused linear
    IA3       a vector scaling a module's output slice, or (o_proj, down_proj) its input
    prefix    per layer P keys and values (no rotary) before the sequence's; the sequence's positions start at P
    prompt    P input embeddings before the sequence's token embeddings, at positions 0..P-1 (P-tuning: made by an
              MLP or LSTM encoder)
    adaption  in the top layers, gated attention over projected prompts, added to the attention output before o_proj
Each method writes adapter_config.json fields and tensors exactly as PEFT's save_pretrained does.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from lanner.config import ModelConfig
from lanner.lora.adapter import ALL_LINEAR, FUSED, SUBMODULES, lora_scaling, submodule_sizes
from lanner.model.layers import Linear
from lanner.model.llama import LlamaForCausalLM


def parse_targets(spec: str | list[str]) -> list[str]:
    """PEFT module names from "all-linear", "q_proj,v_proj" or a list, in ALL_LINEAR order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all-linear"]:
        return list(ALL_LINEAR)
    unknown = [n for n in names if n not in ALL_LINEAR]
    if unknown or not names:
        raise ValueError(f"unknown target modules {unknown}; choose from {list(ALL_LINEAR)} or all-linear")
    return [n for n in ALL_LINEAR if n in names]


class FrozenLinear(nn.Module):
    """A fused decoder linear of the frozen base: its fp weight, or (nf4) an NF4 copy that replaces it."""

    def __init__(self, base: Linear, nf4: bool):
        super().__init__()
        self.base, self.nf4 = base, None
        if nf4:
            from lanner.quant.nf4 import NF4Linear
            self.nf4 = NF4Linear(base.weight.detach(), base.bias)
            base.weight.data = torch.empty(0, dtype=base.weight.dtype)   # the NF4 copy is the base now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nf4 is not None:
            return self.nf4(x)
        return F.linear(x, self.base.weight, self.base.bias)


class LoRALinear(nn.Module):
    """A frozen fused linear plus trainable LoRA on some of the PEFT modules fused in it."""

    def __init__(self, base: FrozenLinear, names: tuple[str, ...], sizes: list[int], targets: set[str], r: int,
                 scaling: float, dropout: float):
        super().__init__()
        self.base, self.names, self.sizes, self.r, self.scaling = base, names, sizes, r, scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name, d_out in zip(names, sizes):
            if name in targets:
                self.lora_A[name] = nn.Parameter(torch.empty(r, base.base.in_features))
                self.lora_B[name] = nn.Parameter(torch.zeros(d_out, r))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init_lora_weights=True: A as nn.Linear initializes its weight, B = 0 (so the delta is 0)."""
        for name in self.lora_A:
            nn.init.kaiming_uniform_(self.lora_A[name], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """All targeted parts at once: [dropout(x) @ A_i^T]_i @ B^T * scaling, B block-diagonal over the
        output slices (zero rows where a part is not targeted); the same sum as one delta per slice."""
        names = list(self.lora_A)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            h = x @ torch.cat([self.lora_A[n] for n in names]).to(x.dtype).T
        else:   # PEFT draws one dropout mask per LoRA module
            h = torch.cat([self.dropout(x) @ self.lora_A[n].to(x.dtype).T for n in names], dim=-1)
        r, k = self.r, len(names)
        rows = [F.pad(self.lora_B[n], (names.index(n) * r, (k - names.index(n) - 1) * r)) if n in self.lora_B
                else h.new_zeros(d_out, k * r, dtype=torch.float32) for n, d_out in zip(self.names, self.sizes)]
        b = torch.cat(rows) if len(rows) > 1 else rows[0]
        return h @ (b * self.scaling).to(x.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y + self.delta(x) if len(self.lora_A) else y


class IA3Linear(nn.Module):
    """A frozen fused linear whose PEFT modules' outputs are scaled by trainable vectors (ones outside them), or,
    for a feed-forward module (alone in its linear: o_proj, down_proj), whose input is."""

    def __init__(self, base: FrozenLinear, names: tuple[str, ...], sizes: list[int], targets: set[str],
                 feedforward: set[str]):
        super().__init__()
        self.base, self.names, self.sizes = base, names, sizes
        d_in = base.base.in_features
        self.ia3_l = nn.ParameterDict({n: nn.Parameter(torch.ones((1, d_in) if n in feedforward else (d_out, 1)))
                                       for n, d_out in zip(names, sizes) if n in targets})   # PEFT: ones
        self.scales_input = bool(set(self.ia3_l) & feedforward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales_input:
            return self.base(x * self.ia3_l[self.names[0]].flatten().to(x.dtype))
        y = self.base(x)
        if not len(self.ia3_l):
            return y
        ones = [y.new_ones(d_out, dtype=torch.float32) for d_out in self.sizes]
        scale = torch.cat([self.ia3_l[n].flatten() if n in self.ia3_l else one for n, one in zip(self.names, ones)])
        return y * scale.to(y.dtype)


class Method(nn.Module):
    """A PEFT method's trainable part: where it acts in the forward (the hooks below; a hook returning None leaves
    the forward as it was) and how PEFT saves it. Its parameters with requires_grad are the trainable ones."""
    peft_type = ""

    def wrap(self, layer: int, path: str, linear: FrozenLinear, names: tuple[str, ...], sizes: list[int]) -> nn.Module:
        """The module that stands for a fused linear of the frozen base."""
        return linear

    def input_prompt(self) -> torch.Tensor | None:
        """[P, hidden]: embeddings before the sequence's token embeddings (positions 0..P-1, the sequence's from P)."""
        return None

    def prefix(self) -> torch.Tensor | None:
        """[layers, 2 (key, value), P, kv heads, head dim]: given before the sequence's (the sequence's from P)."""
        return None

    def adapt_attention(self, layer: int, q: torch.Tensor, qkv: nn.Module) -> torch.Tensor | None:
        """[B, L, heads * head dim] added to a layer's attention output, from its queries q [B, L, heads, dim]."""
        return None

    def peft_config(self, base_model: str) -> dict:
        """The method's fields of adapter_config.json."""
        raise NotImplementedError

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """adapter_model.safetensors: PEFT's keys, shapes and dtype (fp32)."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.peft_type


def saved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous().clone()


def layer_key(layer: int, path: str, name: str) -> str:
    """PEFT's name of a decoder module of layer: base_model.model.model.layers.{i}.self_attn.q_proj and so on."""
    return f"base_model.model.model.layers.{layer}.{path.split('.')[0]}.{name}"


class WrappingMethod(Method):
    """LoRA and IA3: wrappers on the fused linears that hold one of the method's targets."""

    def __init__(self, targets: list[str]):
        super().__init__()
        self.targets, self.wrapped, self.where = set(targets), nn.ModuleList(), []

    def wrap(self, layer, path, linear, names, sizes):
        if not self.targets & set(names):
            return linear
        self.wrapped.append(self.make(linear, names, sizes))
        self.where.append((layer, path))
        return self.wrapped[-1]

    def modules_of(self, params: str):
        """(PEFT module name, wrapper, module) of every trained module, in layer order."""
        for (layer, path), lin in zip(self.where, self.wrapped):
            for name in getattr(lin, params):
                yield layer_key(layer, path, name), lin, name


class LoRA(WrappingMethod):
    peft_type = "LORA"

    def __init__(self, targets: list[str], r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0):
        super().__init__(targets)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r, self.alpha, self.use_rslora, self.dropout = r, alpha, use_rslora, dropout

    def make(self, linear, names, sizes):
        return LoRALinear(linear, names, sizes, self.targets, self.r, lora_scaling(self.r, self.alpha, self.use_rslora),
                          self.dropout)

    def peft_config(self, base_model):
        alpha = int(self.alpha) if float(self.alpha).is_integer() else self.alpha
        return {"r": self.r, "lora_alpha": alpha, "use_rslora": self.use_rslora,
                "target_modules": [n for n in ALL_LINEAR if n in self.targets], "lora_dropout": self.dropout,
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
                "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}

    def peft_state_dict(self):
        return {f"{key}.lora_{m}.weight": saved(getattr(lin, f"lora_{m}")[name])
                for key, lin, name in self.modules_of("lora_A") for m in "AB"}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of peft_state_dict (e.g. to run a saved adapter through this forward)."""
        own = self.peft_state_dict()
        if set(state) != set(own):
            raise ValueError(f"adapter keys differ from this model's LoRA targets: {sorted(set(state) ^ set(own))[:4]}")
        for key, lin, name in self.modules_of("lora_A"):
            for m in "AB":
                getattr(lin, f"lora_{m}")[name].data.copy_(state[f"{key}.lora_{m}.weight"])

    def describe(self):
        return f"LoRA r={self.r} on {','.join(n for n in ALL_LINEAR if n in self.targets)}"


class IA3(WrappingMethod):
    peft_type = "IA3"

    def __init__(self, targets: list[str], feedforward: list[str]):
        super().__init__(targets)
        self.feedforward = set(feedforward)
        if not self.feedforward <= self.targets:
            raise ValueError(f"IA3 feedforward_modules {sorted(self.feedforward - self.targets)} are not among "
                             f"ia3_target_modules {sorted(self.targets)} (PEFT requires a subset)")
        fused = sorted(n for n in self.feedforward if len(FUSED[SUBMODULES[n][0]]) > 1)
        if fused:
            raise ValueError(f"IA3 feedforward (input-scaling) modules {fused}: lanner fuses q/k/v and gate/up into "
                             f"matmuls over one shared input, so only o_proj and down_proj can scale their input")

    def make(self, linear, names, sizes):
        return IA3Linear(linear, names, sizes, self.targets, self.feedforward)

    def peft_config(self, base_model):
        order = [n for n in ALL_LINEAR if n in self.targets]
        return {"target_modules": order, "feedforward_modules": [n for n in order if n in self.feedforward],
                "exclude_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True, "modules_to_save": None}

    def peft_state_dict(self):
        return {f"{key}.ia3_l": saved(lin.ia3_l[name]) for key, lin, name in self.modules_of("ia3_l")}

    def describe(self):
        return f"IA3 on {','.join(sorted(self.targets))} (input of {','.join(sorted(self.feedforward)) or 'none'})"


class PromptLearning(Method):
    """Prefix tuning, prompt tuning and P-tuning: P virtual tokens; PEFT saves its encoder's output (the rows the
    model sees) as `prompt_embeddings`, so a trained encoder (an MLP, an LSTM) is evaluated once, at save."""

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, token_dim: int, heads: int):
        super().__init__()
        if num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {num_virtual_tokens}")
        self.cfg, self.num_virtual_tokens, self.token_dim, self.heads = cfg, num_virtual_tokens, token_dim, heads

    def rows(self) -> torch.Tensor:
        raise NotImplementedError

    def peft_config(self, base_model):
        return {"num_virtual_tokens": self.num_virtual_tokens, "token_dim": self.token_dim,
                "num_transformer_submodules": 1, "num_attention_heads": self.heads, "num_layers": self.cfg.num_layers,
                "modules_to_save": None, **self.encoder_config(base_model)}

    def peft_state_dict(self):
        return {"prompt_embeddings": saved(self.rows())}

    def describe(self):
        return f"{self.peft_type} with {self.num_virtual_tokens} virtual tokens"


class PrefixTuning(PromptLearning):
    """PEFT's PrefixEncoder: an embedding [P, layers * 2 * kv dim] (N(0, 1), nn.Embedding's init), or with
    prefix_projection an embedding [P, kv dim] through Linear - Tanh - Linear."""
    peft_type = "PREFIX_TUNING"

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, projection: bool = False,
                 encoder_hidden_size: int | None = None):
        token_dim = cfg.num_kv_heads * cfg.head_dim   # PEFT sizes the prefix by the key/value heads
        super().__init__(cfg, num_virtual_tokens, token_dim, cfg.num_kv_heads)
        self.projection, self.encoder_hidden_size = projection, encoder_hidden_size or token_dim
        width = cfg.num_layers * 2 * token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim if projection else width)
        if projection:
            self.transform = nn.Sequential(nn.Linear(token_dim, self.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, width))

    def rows(self):
        return self.transform(self.embedding.weight) if self.projection else self.embedding.weight

    def prefix(self):
        c = self.cfg
        return self.rows().view(self.num_virtual_tokens, c.num_layers, 2, c.num_kv_heads, c.head_dim).permute(1, 2, 0, 3, 4)

    def encoder_config(self, base_model):
        return {"encoder_hidden_size": self.encoder_hidden_size, "prefix_projection": self.projection,
                "init_weights": None}


class PromptTuning(PromptLearning):
    """PEFT's PromptEmbedding: P input embeddings, N(0, 1) (RANDOM) or the embeddings of init_ids (TEXT: the init
    text's tokens, repeated or cut to P)."""
    peft_type = "PROMPT_TUNING"

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, init_text: str | None = None,
                 init_ids: list[int] | None = None, word_embeddings: torch.Tensor | None = None):
        super().__init__(cfg, num_virtual_tokens, cfg.hidden_size, cfg.num_heads)
        self.init_text = init_text
        self.embedding = nn.Embedding(num_virtual_tokens, cfg.hidden_size)
        if init_text is not None:
            if not init_ids:
                raise ValueError("prompt_init_text has no tokens")
            ids = (init_ids * math.ceil(num_virtual_tokens / len(init_ids)))[:num_virtual_tokens]
            self.embedding.weight.data = word_embeddings[torch.tensor(ids)].detach().float().clone()

    def rows(self):
        return self.embedding.weight

    def input_prompt(self):
        return self.rows()

    def encoder_config(self, base_model):
        text = self.init_text is not None
        return {"prompt_tuning_init": "TEXT" if text else "RANDOM", "prompt_tuning_init_text": self.init_text,
                "tokenizer_name_or_path": base_model if text else None, "tokenizer_kwargs": None}


class PTuning(PromptLearning):
    """PEFT's PromptEncoder: an embedding [P, hidden] through an MLP (Linear - ReLU - Linear - ReLU - Linear) or a
    2-layer bidirectional LSTM then Linear - ReLU - Linear."""
    peft_type = "P_TUNING"

    def __init__(self, cfg: ModelConfig, num_virtual_tokens: int, encoder_hidden_size: int | None = None,
                 encoder_type: str = "MLP"):
        super().__init__(cfg, num_virtual_tokens, cfg.hidden_size, cfg.num_heads)
        if encoder_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be MLP or LSTM, got {encoder_type!r}")
        d, h = cfg.hidden_size, encoder_hidden_size or cfg.hidden_size
        self.encoder_type, self.encoder_hidden_size = encoder_type, h
        self.embedding = nn.Embedding(num_virtual_tokens, d)
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def rows(self):
        x = self.embedding.weight
        if self.encoder_type == "LSTM":
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)

    def input_prompt(self):
        return self.rows()

    def encoder_config(self, base_model):
        return {"encoder_hidden_size": self.encoder_hidden_size, "encoder_num_layers": 2, "encoder_dropout": 0.0,
                "encoder_reparameterization_type": self.encoder_type}


class AdaptionPrompt(Method):
    """LLaMA-Adapter: in each of the top adapter_layers layers a prompt [1, adapter_len, hidden] (N(0, 1)) and a gate
    (0: the adapter starts as a no-op); the layer's frozen k/v projections of the prompt are attended to by its
    queries in a softmax of their own (lanner.lora.adaption.adaption_attention, as served)."""
    peft_type = "ADAPTION_PROMPT"

    def __init__(self, cfg: ModelConfig, adapter_len: int, adapter_layers: int):
        super().__init__()
        if adapter_len < 1 or not 1 <= adapter_layers <= cfg.num_layers:
            raise ValueError(f"adapter_len must be >= 1 and adapter_layers in 1..{cfg.num_layers} (the base model's "
                             f"layers), got {adapter_len} and {adapter_layers}")
        self.cfg, self.adapter_len, self.first = cfg, adapter_len, cfg.num_layers - adapter_layers
        self.prompts = nn.ParameterList([nn.Parameter(torch.randn(1, adapter_len, cfg.hidden_size))
                                         for _ in range(adapter_layers)])
        self.gates = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(adapter_layers)])

    def adapt_attention(self, layer, q, qkv):
        from lanner.lora.adaption import adaption_attention, prompt_keys_values
        if layer < self.first:
            return None
        c, prompt = self.cfg, self.prompts[layer - self.first][0]
        k, v = prompt_keys_values(qkv(prompt.to(q.dtype)), c.num_heads, c.num_kv_heads, c.head_dim)
        b, length = q.shape[:2]
        return adaption_attention(q.flatten(0, 1), k, v, self.gates[layer - self.first]).view(b, length, -1)

    def peft_config(self, base_model):
        return {"adapter_len": self.adapter_len, "adapter_layers": len(self.prompts), "target_modules": "self_attn"}

    def peft_state_dict(self):
        out = {}
        for i, (prompt, gate) in enumerate(zip(self.prompts, self.gates)):
            out[layer_key(self.first + i, "self_attn", "adaption_prompt")] = saved(prompt)
            out[layer_key(self.first + i, "self_attn", "adaption_gate")] = saved(gate)
        return out

    def describe(self):
        return f"adaption prompt of {self.adapter_len} in the top {len(self.prompts)} layers"


class TrainModel(nn.Module):
    """The decoder (frozen; nf4: its linears in NF4) with a Method acting on it; only the method's parameters train."""

    def __init__(self, model: LlamaForCausalLM, method: Method, nf4: bool = False):
        super().__init__()
        self.model, self.cfg, self.method = model, model.config, method
        model.requires_grad_(False)
        sizes = submodule_sizes(model.config)
        self.linears = nn.ModuleList()   # [layer][fused linear], in FUSED order
        for i, layer in enumerate(model.layers):
            for path, names in FUSED.items():
                frozen = FrozenLinear(layer.get_submodule(path), nf4)
                self.linears.append(method.wrap(i, path, frozen, names, [sizes[n][1] for n in names]))

    def linear(self, layer: int, path: str) -> nn.Module:
        return self.linears[layer * len(FUSED) + list(FUSED).index(path)]

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, L, H] of a right-padded batch's tokens, causal attention. Virtual tokens (an
        input prompt, a prefix) take positions 0..P-1 and the batch's tokens P.., as in PEFT's model."""
        b, n = input_ids.shape
        x = self.model.embed_tokens(input_ids)
        prompt, prefix = self.method.input_prompt(), self.method.prefix()
        if prompt is not None:
            x = torch.cat([prompt.to(x.dtype).expand(b, -1, -1), x], dim=1)
        past, length = 0 if prefix is None else prefix.shape[2], x.shape[1]
        rope = self.model.rotary.table(torch.arange(past, past + length, device=x.device), x.dtype)
        mask = None if prefix is None else torch.ones(length, past + length, dtype=torch.bool).tril(past)
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            x = x + self.linear(i, "self_attn.o_proj")(self.attention(i, h, rope, mask, prefix))
            h = layer.post_attention_layernorm(x)
            gate, up = self.linear(i, "mlp.gate_up_proj")(h).chunk(2, dim=-1)
            x = x + self.linear(i, "mlp.down_proj")(F.silu(gate) * up)
        return self.model.norm(x[:, -n:])

    def attention(self, i: int, h: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                  prefix: torch.Tensor | None) -> torch.Tensor:
        """Layer i's attention output before o_proj [B, L, heads * head dim]; a prefix's keys get no rotary."""
        cfg, (b, length) = self.cfg, h.shape[:2]
        qkv = self.linear(i, "self_attn.qkv_proj")
        q, k, v = qkv(h).split([cfg.num_heads * cfg.head_dim] + 2 * [cfg.num_kv_heads * cfg.head_dim], -1)
        q, k = self.model.layers[i].self_attn.rotary(rope, q.view(b, length, cfg.num_heads, cfg.head_dim),
                                                    k.view(b, length, cfg.num_kv_heads, cfg.head_dim))
        v = v.view(b, length, cfg.num_kv_heads, cfg.head_dim)
        if prefix is not None:
            k, v = (torch.cat([p.to(t.dtype).expand(b, -1, -1, -1), t], dim=1) for p, t in zip(prefix[i], (k, v)))
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              is_causal=mask is None, enable_gqa=cfg.num_heads != cfg.num_kv_heads)
        out = attn.transpose(1, 2).reshape(b, length, -1)
        extra = self.method.adapt_attention(i, q, qkv)
        return out if extra is None else out + extra

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.model.lm_head.weight).float()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.hidden(input_ids))

    def loss(self, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy of the tokens where loss_mask is set, their count); the LM head runs on them only."""
        target_mask = loss_mask[:, 1:]
        hidden = self.hidden(input_ids)[:, :-1][target_mask]
        targets = input_ids[:, 1:][target_mask]
        return F.cross_entropy(self.logits(hidden), targets, reduction="sum"), int(targets.numel())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.method.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable_parameters()]

    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for p, kept in zip(self.trainable_parameters(), snapshot):
            p.data.copy_(kept)


# ModelConfig fields whose values the training forward (Llama's math) handles: name -> the plain value
TRAINABLE_AS_LLAMA = {
    "hidden_act": lambda c: "silu", "rotary_dim": lambda c: c.head_dim, "qk_norm": lambda c: False,
    "sandwich_norms": lambda c: False, "embedding_scale": lambda c: None, "attention_scale": lambda c: None,
    "attn_softcap": lambda c: None, "final_softcap": lambda c: None, "mlp_bias": lambda c: False,
    "local_rope_theta": lambda c: None, "ssm_layers": lambda c: (),
}


def build_model(hf_config: dict, weights: dict[str, torch.Tensor], max_positions: int) -> LlamaForCausalLM:
    """Our decoder with HF-named weights loaded, fp32, for training (no KV cache, no attention backend)."""
    cfg = ModelConfig.from_hf(hf_config)
    departures = [name for name, plain in TRAINABLE_AS_LLAMA.items() if getattr(cfg, name) != plain(cfg)]
    if any(w is not None and w < max_positions for w in cfg.layer_windows):   # longer examples than the window
        departures.append("layer_windows")
    if departures:
        raise ValueError(f"fine-tuning {cfg.architecture} is not supported: the training forward is Llama's "
                         f"and this model differs in {', '.join(departures)}")
    model = LlamaForCausalLM(cfg, backend=None, max_positions=max_positions)
    model.load_hf_weights(weights)
    return model.float()
