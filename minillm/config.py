"""The model's shape: one dataclass, validated when it is built, and the named presets.

Why a dataclass: every field has a type (the command-line layer in `minillm.cli` reads it), a default
and a one-line comment (`--help` prints it). Bad values fail here, with a `ValueError` that names the
field, rather than as a shape mismatch deep inside torch three minutes into a run.

The presets are GPT-2's four published sizes and three small ones sized for a laptop CPU. Scripts
that train a tokenizer set `vocab_size` from it, so the small presets' vocabulary is only a default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# "auto" picks the fused Triton kernels for CUDA tensors when Triton is importable, PyTorch otherwise.
IMPLS = ("auto", "torch", "triton")


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT-2-style decoder; `GPTConfig.from_preset("gpt2")` gives GPT-2 small."""

    vocab_size: int = 50257  # tokens in the vocabulary (GPT-2's BPE has 50,257)
    block_size: int = 1024  # longest sequence the model reads: the size of the position table
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block; must divide n_embd
    n_embd: int = 768  # width of the residual stream
    mlp_ratio: int = 4  # MLP hidden width as a multiple of n_embd (GPT-2 uses 4)
    dropout: float = 0.0  # dropout on attention weights, residual branches and embeddings
    bias: bool = True  # biases in the Linear and LayerNorm layers, as GPT-2 has them
    tie_embeddings: bool = True  # lm_head shares its weight with the token embedding wte
    layer_norm_eps: float = 1e-5  # epsilon inside every LayerNorm (GPT-2: 1e-5)
    impl: str = "auto"  # attention/layernorm code path: auto, torch or triton (a runtime choice)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0.0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"GPTConfig.impl must be one of {', '.join(IMPLS)}; got {self.impl!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """The named preset with some fields replaced, e.g. `from_preset("tiny", vocab_size=512)`."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    # GPT-2 as released by OpenAI (Radford et al. 2019), all with a 1024-token context.
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small models for a CPU. With a 4096-token vocabulary: tiny 0.37M parameters (seconds per
    # hundred steps), mini 1.35M (minutes), small 12.3M (tens of minutes; starts to read like text).
    "tiny": GPTConfig(vocab_size=4096, block_size=128, n_layer=2, n_head=2, n_embd=64),
    "mini": GPTConfig(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "small": GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384),
}
