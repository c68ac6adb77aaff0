"""GPT-2, top to bottom: embeddings, pre-LayerNorm transformer blocks, a tied output head.

    idx (B, T) token ids
      -> wte(idx) + wpe(0..T-1)                     token and learned position embeddings
      -> n_layer x Block:  x = x + attn(ln_1(x))    causal multi-head self-attention
                           x = x + mlp(ln_2(x))     Linear -> GELU (tanh approximation) -> Linear
      -> ln_f -> lm_head                            logits (B, T, vocab_size)

Parameter names are GPT-2's (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so the weights of
the released GPT-2 map one to one (the Hugging Face files store the Linear weights transposed, as
Conv1D). LayerNorm and attention go through `minillm.ops`, the one dispatch point between PyTorch and
the fused Triton kernels; `GPTConfig.impl` picks the path.

Decoding with a KV cache (`minillm.kv_cache.KVCache`, used by `minillm.generate`): pass `cache=` to
`forward` or `hidden_states` and `idx` continues the sequences stored in the cache. Each row's
positions start where its cached tokens end, each attention layer appends its new keys and values
to the cache and attends over all of them, and the cache advances by T. Without a cache, `forward`
is the plain full-sequence pass used for training.

`forward` checks its input and raises `TypeError`/`ValueError` with the problem spelled out (wrong dtype
or rank, a sequence longer than the block size, a token id outside the vocabulary) instead of letting
an index error or a CUDA device-side assert surface from deep inside torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from minillm import ops
from minillm.config import GPTConfig

IGNORE_INDEX = -100  # target value that the loss skips (padding, prompt tokens); torch's default


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's nn.LayerNorm cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float, impl: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, impl=self.impl)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position attends to itself and the positions before it."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.impl = config.impl
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv=None) -> torch.Tensor:
        """`kv`, when decoding with a KV cache: a function that stores this call's keys and values in
        the cache and returns every key and value the queries may see, with their mask."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # split the channels into heads: (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        mask = None  # None: the causal mask, aligned to the end of the keys
        if kv is not None:
            k, v, mask = kv(k, v)  # (B, nh, Tk, hs): the cached prefix then these T; mask (B, 1, T, Tk) or None
        dropout_p = self.dropout if self.training else 0.0
        y = ops.attention(q, k, v, causal=mask is None, mask=mask, dropout_p=dropout_p, impl=self.impl)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: widen, GELU, narrow."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # subtle: GPT-2 was trained with the tanh approximation of GELU; the exact erf form gives
        # logits that differ from the released weights' by ~1e-3
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: normalise, transform, add back to the residual stream."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, config.impl)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, config.impl)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """The GPT-2 language model: `forward(idx, targets=None) -> (logits, loss)`."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embedding
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embedding
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, config.impl),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # set by the trainer: recompute each block's activations in the backward pass (less memory)
        self.activation_checkpointing = False
        if config.tie_embeddings:
            # one matrix both reads tokens in and scores them out (GPT-2 does this; saves V x C params)
            self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's initialisation, applied to every submodule.

        - Linear weights and the token embedding: normal with std 0.02 (GPT-2's choice, roughly
          1/sqrt(768)); biases zero; LayerNorm starts as the identity (weight 1, bias 0).
        - The position table: std 0.01, as in OpenAI's released GPT-2 code.
        - The projections that write into the residual stream (`attn.c_proj`, `mlp.c_proj`): std
          0.02 / sqrt(2 * n_layer). Each block adds two such outputs to the stream; scaling them keeps
          the stream's variance from growing with depth (GPT-2 paper, section 2.3).
        """
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module is self.lm_head and self.config.tie_embeddings:
                    continue  # its weight is wte's, initialised as an embedding below
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.01 if name.endswith("wpe") else 0.02)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once. `non_embedding` leaves out the lookup-only tables.

        The lookup-only tables are the position table and, when not tied to the head, the token
        table; with tied embeddings wte is also the output projection, a real matmul, so it stays.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> float:
        """Matmul FLOPs per token, by the PaLM appendix B convention that MFU figures use.

        Forward: 2 FLOPs per multiply-accumulate with each non-embedding weight, plus attention's
        two (T x T) products, 2 * 2 * T * C per layer (counted in full, the causal half included,
        as is conventional). Training adds the backward pass, twice the forward: 3x in total.
        """
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        forward = 2 * self.num_params(non_embedding=True) + 4 * cfg.n_layer * T * cfg.n_embd
        return 3.0 * forward if training else float(forward)

    def check_input(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Raise a clear error for token ids the model cannot read (see the module docstring)."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must hold integer token ids (torch.long), got dtype {idx.dtype}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, time), got {idx.dim()} dimension(s): {tuple(idx.shape)}")
        T = idx.shape[1]
        if T == 0:
            raise ValueError("idx has no tokens (time dimension is 0)")
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the block size {self.config.block_size}")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets))}")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {tuple(idx.shape)}")
        if torch.compiler.is_compiling():
            return  # the value checks below need the data, which would break the compiled graph
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if targets is not None:
            valid = targets[targets != IGNORE_INDEX]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.config.vocab_size):
                raise ValueError(
                    f"target ids must be in [0, {self.config.vocab_size}) or {IGNORE_INDEX} (ignored); "
                    f"got values in [{int(valid.min())}, {int(valid.max())}]"
                )

    def hidden_states(self, idx: torch.Tensor, *, cache=None) -> torch.Tensor:
        """The final hidden states (B, T, C), after ln_f, for token ids `idx` (B, T): what `lm_head`
        scores. Generation scores only the positions it samples from; classifiers put their own head
        here. With `cache` (a KVCache or a view of some of its rows), `idx` continues its sequences."""
        self.check_input(idx)
        T = idx.shape[1]
        step = None
        if cache is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
        else:
            step = cache.step(T)  # room for T more tokens in each row (a clear error when full)
            pos = step.positions  # (T,) or (B, T): each row continues where its cached tokens end
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if step is None and self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, None if step is None else step.layer(i))
        return self.transformer.ln_f(x)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); with `targets` (B, T), also the mean
        cross-entropy over the targets that are not IGNORE_INDEX. `cache`: see `hidden_states`."""
        if targets is not None:
            self.check_input(idx, targets)
        logits = self.lm_head(self.hidden_states(idx, cache=cache))  # (B, T, vocab_size)
        B, T = idx.shape
        loss = None
        if targets is not None:
            # subtle: half-precision logits (autocast) are upcast for a stable log-sum-exp, but never
            # downcast: float64 must stay float64 for gradcheck
            flat = logits.view(B * T, -1)
            flat = flat.float() if flat.element_size() < 4 else flat
            loss = F.cross_entropy(flat, targets.reshape(B * T).long(), ignore_index=IGNORE_INDEX)
        return logits, loss
