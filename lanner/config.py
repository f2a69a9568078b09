"""Engine and model configuration dataclasses."""
from dataclasses import dataclass, field, replace


@dataclass
class ModelConfig:
    """The decoder's shape and math, read from an HF config dict as the installed transformers writes it
    (GGUF metadata is converted to one). One decoder covers every architecture: the fields past
    `eos_token_id` are the ways Qwen3, Gemma 2/3, Phi-3 and Mistral depart from Llama."""
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    mlp_bias: bool = False
    o_proj_bias: bool = False                 # attention_bias covers o_proj too, except in Qwen2
    hidden_act: str = "silu"                  # silu | gelu_pytorch_tanh, of gate in act(gate) * up
    rotary_dim: int | None = None             # partial rotary: the first rotary_dim dims of a head rotate
    qk_norm: bool = False                     # RMSNorm of each q and k head before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False              # norms after attention and MLP too (Gemma 2/3)
    norm_offset: float = 0.0                  # RMSNorm scales by offset + weight (Gemma: 1)
    embedding_scale: float | None = None      # token embeddings times this (Gemma: sqrt(hidden_size))
    attention_scale: float | None = None      # softmax scale, default head_dim ** -0.5
    attn_softcap: float | None = None         # attention logits -> c * tanh(logits / c) (Gemma 2)
    final_softcap: float | None = None        # LM-head logits the same
    layer_windows: tuple = ()                 # per layer: sliding window in tokens, or None (full attention)
    local_rope_theta: float | None = None     # rotary base of sliding-window layers, when theirs differs
    ssm: dict | None = None                   # the SSM mixers' config (Mamba's config.json, a hybrid's translated)
    ssm_layers: tuple = ()                    # layers whose mixer is an SSM: all of a Mamba's, some of a hybrid's

    ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                     "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")
    ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

    SSM_ARCHITECTURES = ("MambaForCausalLM", "Mamba2ForCausalLM")
    HYBRID_ARCHITECTURES = ("BambaForCausalLM",)   # Mamba-2 mixers in some layers, attention in the others

    @property
    def num_kv_layers(self) -> int:
        """Layers that keep attention KV in the paged cache."""
        return self.num_layers - len(self.ssm_layers)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch in cls.SSM_ARCHITECTURES:
            return cls.for_ssm(hf, arch)
        if arch not in cls.ARCHITECTURES + cls.HYBRID_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: "
                             f"{list(cls.ARCHITECTURES + cls.SSM_ARCHITECTURES + cls.HYBRID_ARCHITECTURES)}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        full, local = rope_parameters(hf, "full_attention"), rope_parameters(hf, "sliding_attention")
        gemma = arch.startswith("Gemma")
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in cls.ACTIVATIONS:
            raise ValueError(f"unsupported hidden activation {act!r}; supported: {list(cls.ACTIVATIONS)}")
        eos = hf.get("eos_token_id")
        return replace(cls(
            architecture=arch, hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim, vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(full.get("rope_theta", 10000.0)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
            attention_bias=hf.get("attention_bias", arch == "Qwen2ForCausalLM"),
            rope_scaling=rope_scaling(full), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos, mlp_bias=hf.get("mlp_bias", False),
            o_proj_bias=hf.get("attention_bias", False) and arch != "Qwen2ForCausalLM",
            hidden_act=act, rotary_dim=int(head_dim * full.get("partial_rotary_factor", 1.0)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Gemma3ForCausalLM"), sandwich_norms=gemma,
            norm_offset=1.0 if gemma else 0.0, embedding_scale=hf["hidden_size"] ** 0.5 if gemma else None,
            attention_scale=hf["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
            layer_windows=layer_windows(hf, arch),
            local_rope_theta=local_rope_theta(full, local)), **bamba_mixers(hf, arch))

    @classmethod
    def for_ssm(cls, hf: dict, arch: str) -> "ModelConfig":
        """A Mamba model: no attention heads; the context length is unbounded by the model (16k by default)."""
        eos = hf.get("eos_token_id")
        return cls(architecture=arch, hidden_size=hf["hidden_size"], intermediate_size=hf.get("intermediate_size", 0),
                   num_layers=hf["num_hidden_layers"], num_heads=0, num_kv_heads=0, head_dim=0,
                   vocab_size=hf["vocab_size"], rms_norm_eps=hf.get("layer_norm_epsilon", 1e-5), rope_theta=0.0,
                   max_position_embeddings=hf.get("max_position_embeddings") or 16384,
                   tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=False,
                   bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos, ssm=hf,
                   ssm_layers=tuple(range(hf["num_hidden_layers"])))


def bamba_mixers(hf: dict, arch: str) -> dict:
    """A Bamba's SSM layers (those not in attn_layer_indices), their Mamba-2 mixers' config under Mamba2Config's
    names, and its rotary width; {} for other architectures."""
    if arch != "BambaForCausalLM":
        return {}
    hidden, expand, heads = hf["hidden_size"], hf.get("mamba_expand", 2), hf.get("mamba_n_heads", 128)
    head_dim = hf.get("mamba_d_head", "auto")
    mixer = {"hidden_size": hidden, "expand": expand, "num_heads": heads,
             "head_dim": expand * hidden // heads if head_dim == "auto" else head_dim,
             "n_groups": hf.get("mamba_n_groups", 1), "state_size": hf.get("mamba_d_state", 256),
             "conv_kernel": hf.get("mamba_d_conv", 4), "use_conv_bias": hf.get("mamba_conv_bias", True),
             "use_bias": hf.get("mamba_proj_bias", False), "layer_norm_epsilon": hf.get("rms_norm_eps", 1e-5),
             "hidden_act": hf.get("hidden_act", "silu"),
             "time_step_limit": hf.get("time_step_limit") or (0.0, float("inf"))}
    attention = set(hf.get("attn_layer_indices") or ())
    ssm_layers = tuple(i for i in range(hf["num_hidden_layers"]) if i not in attention)
    # as BambaConfig: half of each head rotates unless rope_parameters says otherwise (older configs' top-level
    # keys and attn_rotary_emb are not read)
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 0.5)
    return {"ssm": mixer if ssm_layers else None, "ssm_layers": ssm_layers,
            "rotary_dim": int(rotary * (hf.get("head_dim") or hidden // hf["num_attention_heads"]))}


def rope_parameters(hf: dict, layer_type: str) -> dict:
    """The rope settings of a layer type. transformers 5 writes `rope_parameters` (one dict, or one per layer
    type as Gemma 3 does); older versions top-level `rope_theta`, `rope_scaling`, `partial_rotary_factor`."""
    params = hf.get("rope_parameters")
    if params and layer_type in params:
        params = params[layer_type]
    elif params and isinstance(next(iter(params.values()), None), dict):
        params = next(iter(params.values()))
    if not params:   # Gemma 3 before transformers 5: sliding layers rotate with rope_local_base_freq, unscaled
        if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
            return {"rope_theta": hf["rope_local_base_freq"]}
        legacy = {k: hf[k] for k in ("rope_theta", "partial_rotary_factor") if hf.get(k) is not None}
        params = {**(hf.get("rope_scaling") or {}), **legacy}
    if "original_max_position_embeddings" in hf:   # Phi-3 keeps it beside the rope settings
        params = {"original_max_position_embeddings": hf["original_max_position_embeddings"], **params}
    return params


def local_rope_theta(full: dict, local: dict) -> float | None:
    """The rotary base of sliding-window layers where it differs from the others' (Gemma 3)."""
    if local == full or "rope_theta" not in local:
        return None
    if rope_scaling(local) is not None:
        raise ValueError(f"unsupported rope scaling {local} on sliding-window layers")
    return float(local["rope_theta"])


def rope_scaling(params: dict) -> dict | None:
    """The scaling part of rope settings: None for plain rotary; an unknown type is refused by name."""
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    return params


ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def layer_windows(hf: dict, arch: str) -> tuple:
    """Each layer's sliding window (None: full attention). transformers 5 writes `layer_types`; Mistral and
    Phi-3 apply `sliding_window` to every layer; older Qwen2 configs name windowed layers by
    use_sliding_window / max_window_layers, older Gemma configs by their alternation pattern."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    types = hf.get("layer_types")
    if types is None:
        if arch.startswith("Qwen"):
            first = hf.get("max_window_layers", n) if hf.get("use_sliding_window") else n
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        elif arch.startswith("Gemma"):
            pattern = 2 if arch.startswith("Gemma2") else hf.get("sliding_window_pattern", 6)
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        else:
            types = ["sliding_attention"] * n
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer types {sorted(unknown)}; supported: sliding_attention, full_attention")
    return tuple(window if t == "sliding_attention" and window else None for t in types)


@dataclass
class SpeculativeConfig:
    """{"method": "ngram" | "draft" | "eagle" | "eagle+ngram", "num_speculative_tokens": k, "model": path (a draft
    model; an EAGLE head's directory, default: the head shipped for the target)}. eagle+ngram: a sequence whose
    last n tokens (n from prompt_lookup_max down to prompt_lookup_min, both at least 3) occurred before drafts
    the k tokens that followed them (copying), the others draft with the head."""
    method: str
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    max_batch_size: int = 16      # back off: no drafts when more sequences than this are running

    @property
    def uses_head(self) -> bool:
        return self.method in ("eagle", "eagle+ngram")

    def __post_init__(self):
        if self.method not in ("ngram", "draft", "eagle", "eagle+ngram"):
            raise ValueError(f"speculative method must be 'ngram', 'draft', 'eagle' or 'eagle+ngram', "
                             f"got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs a draft model path")

    @classmethod
    def parse(cls, spec) -> "SpeculativeConfig | None":
        """From a dict, a SpeculativeConfig, or the CLI forms 'ngram:4', 'draft:PATH:4', 'eagle:4' and
        'eagle:PATH:4'."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        method, *rest = str(spec).split(":")
        k = rest.pop() if rest and rest[-1].isdigit() else "4"
        path = ":".join(rest) or None
        if method == "draft" and not path:
            raise ValueError("--speculative draft needs a model: draft:PATH[:K]")
        if path and method == "ngram":  # eagle+ngram takes the head's path
            raise ValueError(f"--speculative ngram takes no path, got {spec!r}: ngram[:K]")
        return cls(method, int(k), path)


QUANTIZATIONS = ("auto", "none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "bf16", "nf4")   # weight formats an HF model loads into
QUANTIZATION_ALIASES = {"int8": "q8_0", "int4": "q4_1"}


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"                       # float32 | bfloat16 | auto
    max_model_len: int | None = None          # default: min(model's context, 4096)
    block_size: int = 16
    num_kv_blocks: int | None = None          # default: from kv_cache_memory
    kv_cache_memory: float = 2.0              # GiB
    kv_cache_dtype: str = "auto"              # auto (the model's dtype) | float32 | bfloat16 | float16
    prefault_kv_cache: bool = False           # CPU: the KV pool's pages faulted in at start-up, not at first write
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    num_scheduler_steps: int = 8              # greedy decode steps a batch may run in one call (1: one per step)
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"           # reference | cpu | triton | auto
    device: str = "cpu"
    seed: int = 0
    speculative: SpeculativeConfig | dict | str | None = None
    quantization: str = "auto"                # auto | none | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | bf16 | nf4 (int8 =
    #                                           q8_0, int4 = q4_1; bf16: GGML BF16 rows, the LM head too; auto: bf16
    #                                           where the linears hold bf16 values, else none: resolve_quantization)
    dense_gemm_weights: bool | None = None   # GGUF blocks also held dense (oneDNN, made at the first big step)
    #                                          for big steps; None: where the int8 GEMM does not run, and in bf16
    #                                          where oneDNN runs bf16 on AMX tiles
    enable_lora: bool = False
    max_loras: int = 8                        # distinct adapters in one step
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None          # validated adapters kept loaded (LRU), default max_loras
    limit_mm_per_prompt: dict = field(default_factory=dict)   # {"image": N}: images one prompt may carry (4)
    allowed_local_media_path: str | None = None   # file:// image URLs are read only from inside this directory
    tensor_parallel_size: int = 1             # ranks that split every layer (lanner.distributed); 1 = one process
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.speculative = SpeculativeConfig.parse(self.speculative)
        self.limit_mm_per_prompt = {"image": 4, **self.limit_mm_per_prompt}
        if set(self.limit_mm_per_prompt) - {"image"} or any(
                not isinstance(n, int) or n < 0 for n in self.limit_mm_per_prompt.values()):
            raise ValueError(f"limit_mm_per_prompt takes {{'image': N}} with N >= 0, got {self.limit_mm_per_prompt!r}")
        self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or int8, int4), "
                             f"got {self.quantization!r}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if self.kv_cache_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"kv_cache_dtype must be auto, float32, bfloat16 or float16, got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype != "auto" and self.device != "cpu":
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype} is for the CPU backend; on {self.device} the "
                             f"cache takes the model's dtype (kv_cache_dtype=auto)")
