"""Engine and model configuration dataclasses."""
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The decoder's shape, read from an HF config dict (GGUF metadata is converted to one)."""
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

    ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in cls.ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; supported: {list(cls.ARCHITECTURES)}")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch, hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", arch == "Qwen2ForCausalLM"),
            rope_scaling=rope_scaling(hf), bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos)


def rope_theta(hf: dict) -> float:
    """transformers 5 writes `rope_parameters: {rope_theta, rope_type, ...}`; older versions `rope_theta`."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def rope_scaling(hf: dict) -> dict | None:
    """The rope scaling, from either format; None for plain rotary."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type"))
    return None if kind in (None, "default") else scaling


@dataclass
class SpeculativeConfig:
    """{"method": "ngram" | "draft", "num_speculative_tokens": k, "model": path (draft only)}."""
    method: str
    num_speculative_tokens: int = 4
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    max_batch_size: int = 16      # back off: no drafts when more sequences than this are running

    def __post_init__(self):
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft', got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs a draft model path")

    @classmethod
    def parse(cls, spec) -> "SpeculativeConfig | None":
        """From a dict, a SpeculativeConfig, or the CLI forms 'ngram:4' and 'draft:PATH:4'."""
        if spec is None or isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        method, *rest = str(spec).split(":")
        if method == "draft":
            if not rest:
                raise ValueError("--speculative draft needs a model: draft:PATH[:K]")
            path, k = (":".join(rest[:-1]), rest[-1]) if len(rest) > 1 and rest[-1].isdigit() else (":".join(rest), "4")
            return cls("draft", int(k), path)
        return cls(method, int(rest[0]) if rest else 4)


QUANTIZATIONS = ("none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "nf4")   # weight formats an HF model loads into
QUANTIZATION_ALIASES = {"int8": "q8_0", "int4": "q4_1"}


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"                       # float32 | bfloat16 | auto
    max_model_len: int | None = None          # default: min(model's context, 4096)
    block_size: int = 16
    num_kv_blocks: int | None = None          # default: from kv_cache_memory
    kv_cache_memory: float = 2.0              # GiB
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"           # reference | cpu | triton | auto
    device: str = "cpu"
    seed: int = 0
    speculative: SpeculativeConfig | dict | str | None = None
    quantization: str = "none"                # none | q8_0 | q4_0 | q4_1 | q5_0 | q5_1 | nf4 (int8 = q8_0, int4 = q4_1)
    dense_gemm_weights: bool = True          # GGUF blocks also held dense (oneDNN) for steps of > 16 rows
    enable_lora: bool = False
    max_loras: int = 8                        # distinct adapters in one step
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None          # validated adapters kept loaded (LRU), default max_loras
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.speculative = SpeculativeConfig.parse(self.speculative)
        self.quantization = QUANTIZATION_ALIASES.get(self.quantization, self.quantization)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or int8, int4), "
                             f"got {self.quantization!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
