"""GPT-2 in Hugging Face's folder layout, in and out, and the one loader for a model to sample from.

A Hugging Face GPT-2 folder (what `GPT2LMHeadModel.save_pretrained` writes, or a downloaded `gpt2`):

    config.json            n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon, ...
    model.safetensors      weights (or pytorch_model.bin, or shards listed in *.index.json)
    vocab.json, merges.txt the byte-level BPE tokenizer (optional), with GPT-2's split pattern
    tokenizer.json         the same tokenizer for transformers' fast tokenizers, its split pattern stated

Mapping to minillm: parameter names are the same, with or without the `transformer.` prefix. GPT-2
stores its four projection weights as Conv1D, (in, out), the transpose of nn.Linear's (out, in), so
`c_attn`, `attn.c_proj`, `c_fc` and `mlp.c_proj` weights are transposed both ways. The `attn.bias`
and `attn.masked_bias` entries of old files are not weights but stored causal-mask buffers, and are
skipped. The tied `lm_head.weight` is wte's tensor and is written once.

Importing checks the config for what minillm's GPT cannot represent (another activation, no
attention scaling, cross-attention) and says which field. Exporting writes config.json, the weights
with our own safetensors writer (`{"format": "pt"}` metadata, which transformers requires) and the
tokenizer files, so `GPT2LMHeadModel.from_pretrained(folder)` and `AutoTokenizer.from_pretrained(folder)`
load it offline. Nothing is unpickled: `pytorch_model.bin` goes through `torch.load(weights_only=True)`.

`load_pretrained(path)` opens either kind of folder (or a minillm run folder) with its tokenizer and,
for an instruction-finetuned checkpoint, its prompt template: what sample.py, evaluation and the
server load models with.

Command line:

    python -m minillm.hf export runs/demo hf/demo        # newest checkpoint of a run -> HF folder
    python -m minillm.hf import path/to/gpt2 runs/gpt2   # HF folder -> minillm checkpoint (step 0)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm.checkpoint import load_checkpoint, model_tensors, save_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.prompts import PromptTemplate
from minillm.safetensors import load_file, save_file
from minillm.tokenizer import GPT2_PATTERN, PATTERNS, TOKENIZER_FILE, Tokenizer, open_tokenizer

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 files, not weights
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
EOT = "<|endoftext|>"
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation GPT-2 was trained with


def is_hf_folder(path: str | os.PathLike) -> bool:
    """True for a folder with config.json and a weights file in Hugging Face's names."""
    path = Path(path)
    return (path / "config.json").is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> GPTConfig:
    """GPTConfig for a Hugging Face GPT-2 config; a clear error for what minillm cannot represent."""
    def need(field: str, ok: bool, why: str) -> None:
        if not ok:
            raise ValueError(f"{source}: {field}={hf.get(field)!r} is not supported: {why}")

    need("model_type", hf.get("model_type", "gpt2") == "gpt2", "only GPT-2 checkpoints can be imported")
    need("activation_function", hf.get("activation_function", "gelu_new") in TANH_GELUS,
         f"minillm's MLP uses the tanh GELU ({', '.join(TANH_GELUS)})")
    need("scale_attn_weights", hf.get("scale_attn_weights", True), "attention is always scaled by 1/sqrt(head size)")
    need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx", False), "no per-layer attention scaling")
    need("add_cross_attention", not hf.get("add_cross_attention", False), "decoder-only model, no cross-attention")
    for field in ("n_embd", "n_layer", "n_head", "vocab_size"):
        need(field, isinstance(hf.get(field), int), "a required integer field is missing")
    n_embd, n_inner = hf["n_embd"], hf.get("n_inner")
    need("n_inner", n_inner is None or n_inner % n_embd == 0, f"the MLP width must be a multiple of n_embd ({n_embd})")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
            mlp_ratio=4 if n_inner is None else n_inner // n_embd, dropout=float(hf.get("resid_pdrop", 0.0)),
            bias=True, tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def config_to_hf(config: GPTConfig, eot_id: int | None = None) -> dict[str, Any]:
    """The config.json transformers' GPT2LMHeadModel reads for a minillm GPTConfig."""
    if not config.bias:
        raise ValueError("cannot export to Hugging Face GPT-2: its layout has biases everywhere, this model has bias=False")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None if config.mlp_ratio == 4 else config.mlp_ratio * config.n_embd,
        "activation_function": "gelu_new", "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "use_cache": True, "dtype": "float32",
    }


def state_from_hf(hf_state: dict[str, torch.Tensor], config: GPTConfig, source: str = "weights") -> dict[str, torch.Tensor]:
    """Hugging Face GPT-2 tensors -> minillm's state dict (prefix added, Conv1D transposed, buffers dropped)."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(MASK_BUFFERS):
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # saved from GPT2Model, or the original release
        state[name] = tensor.t() if name.endswith(CONV1D) else tensor
    if config.tie_embeddings:
        wte, head = state.get("transformer.wte.weight"), state.pop("lm_head.weight", None)
        if head is not None and wte is not None and not torch.equal(head, wte):
            raise ValueError(f"{source}: lm_head.weight differs from wte but config.json says tie_word_embeddings")
    return state


def state_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """minillm's weights in Hugging Face GPT-2's names and layout (Conv1D transposed, contiguous)."""
    return {name: (t.t() if name.endswith(CONV1D) else t).detach().contiguous() for name, t in model_tensors(model).items()}


def model_from_state(config: GPTConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, source: str = "weights") -> GPT:
    """A GPT holding exactly `state` (minillm names, tied head once); errors list what does not fit."""
    with torch.device("meta"):  # no point initialising weights that are replaced at once
        model = GPT(config)
    expected = {n: p.shape for n, p in model.state_dict().items() if not (config.tie_embeddings and n == "lm_head.weight")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{n} {tuple(state[n].shape)} != {tuple(s)}" for n, s in expected.items() if n in state and state[n].shape != s]
    if missing or unexpected or wrong:
        raise ValueError(f"{source} does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}")
    state = {n: t.to(device=device, dtype=dtype or t.dtype).contiguous() for n, t in state.items()}
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter
    return model.eval()


def read_hf_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: model.safetensors, pytorch_model.bin, or the shards of an index."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).is_file():
            weight_map = json.loads((folder / index_name).read_text(encoding="utf-8")).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index_name}: no weight_map object")
            state = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_read_weight_file(folder / shard))
            return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weight_file(folder / name)
    raise FileNotFoundError(f"{folder}: no weights ({', '.join(WEIGHT_FILES)})")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    # weights_only: tensors and plain containers only; a pickle that wants to run code is refused
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_hf_gpt2(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                 **config_overrides) -> tuple[GPT, Tokenizer | None]:
    """(model, tokenizer or None) from a Hugging Face GPT-2 folder, the model in eval mode."""
    folder = Path(folder)
    source = folder / "config.json"
    try:
        hf_config = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON (line {err.lineno}: {err.msg})") from None
    config = config_from_hf(hf_config, str(source))
    if config_overrides:
        config = GPTConfig(**{**config.__dict__, **config_overrides})
    state = state_from_hf(read_hf_weights(folder), config, str(folder))
    model = model_from_state(config, state, device, dtype, source=str(folder))
    return model, read_hf_tokenizer(folder)


def read_hf_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer of a HF folder: tokenizer.json (which states its split pattern) when there is
    one minillm can read, else vocab.json + merges.txt (GPT-2's split), else None."""
    gpt2_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if (folder / "tokenizer.json").is_file():
        try:
            split = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
            regexes = [step.get("pattern", {}).get("Regex") for step in split.get("pretokenizers", []) if step.get("type") == "Split"]
            # a built-in pattern we exported in Oniguruma's spelling: read it back under its own name
            known = next((p for p in PATTERNS.values() if regexes and onig_pattern(p) == regexes[0]), None)
            return open_tokenizer(folder / "tokenizer.json", pattern=known)
        except (ValueError, AttributeError) as err:
            if not gpt2_files:
                raise
            warnings.warn(f"{folder / 'tokenizer.json'}: {err}; reading vocab.json + merges.txt instead", stacklevel=2)
    return Tokenizer.from_gpt2_files(folder / "vocab.json", folder / "merges.txt") if gpt2_files else None


def export_hf_gpt2(model: GPT, out: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face GPT-2 folder `out`, which must not exist yet.

    Written into a temporary folder first and renamed, so `out` is complete or absent.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists: export into a new folder")
    eot = getattr(tokenizer, "eot_id", None)
    hf_config = config_to_hf(model.config, eot)
    hf_config["dtype"] = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_json(tmp / "config.json", hf_config)
        save_file(state_to_hf(model), tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            write_hf_tokenizer(tokenizer, tmp, model.config.block_size)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, max_length: int) -> None:
    """The tokenizer files of a HF GPT-2 folder: vocab.json + merges.txt (the tokenizer's own GPT-2
    export), tokenizer_config.json and special_tokens_map.json, and tokenizer.json, the fast tokenizer.

    Why tokenizer.json too: vocab.json + merges.txt imply GPT-2's split pattern, but a minillm
    tokenizer may be trained with another (e.g. cl100k's). tokenizer.json states ours explicitly, as a
    Split pre-tokenizer before the byte-level mapping, and tokenizer_config.json then names the
    generic fast tokenizer (transformers' GPT2Tokenizer would impose GPT-2's split), so transformers
    splits text exactly as we do.
    """
    tokenizer.save_gpt2_files(folder)  # vocab.json + merges.txt
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
    specials = tokenizer.special_tokens
    eot = EOT if EOT in specials else None
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    _write_json(folder / "tokenizer.json", {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for token, i in sorted(specials.items(), key=lambda x: x[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": onig_pattern(tokenizer.pattern)}, "behavior": "Isolated", "invert": False},
            byte_level]},
        "post_processor": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    })
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot} if eot else {}
    gpt2_split = onig_pattern(tokenizer.pattern) == onig_pattern(GPT2_PATTERN)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer" if gpt2_split else "PreTrainedTokenizerFast", "model_max_length": max_length, "add_prefix_space": False,
        "errors": "replace", "additional_special_tokens": sorted(t for t in specials if t != eot), **special})
    _write_json(folder / "special_tokens_map.json", special)


def onig_pattern(pattern: str) -> str:
    """Our split pattern (Python `regex` syntax) for the Oniguruma engine inside `tokenizers`.

    subtle: Oniguruma reads `{1,3}+` as "one or more runs of 1 to 3", not as a possessive interval,
    so cl100k's `\\p{N}{1,3}+` would swallow any number of digits. Dropping the `+` is exact where
    nothing after the interval could backtrack into it, as at the end of an alternative (cl100k's case).
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


@dataclass
class Pretrained:
    """A model opened for inference, with what it needs to read and write text."""

    model: GPT
    tokenizer: Tokenizer | None  # None when the folder has none
    template: PromptTemplate | None  # the instruction template it was finetuned with, if any
    source: str  # what was loaded, for messages


def resolve_device_and_dtype(device: str = "auto", dtype: str = "auto") -> tuple[str, torch.dtype]:
    """The device and dtype to run inference in (sample.py's and serve.py's --device/--dtype): "auto"
    is cuda when available, else cpu; and bfloat16 on a GPU that has it, else float32."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if dtype != "auto":
        return device, getattr(torch, dtype)
    fast_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if fast_bf16 else torch.float32


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    **config_overrides) -> Pretrained:
    """The one loader for sampling, evaluation and serving: a minillm checkpoint folder, a run folder
    (its newest checkpoint) or a Hugging Face GPT-2 folder."""
    path = Path(path)
    if is_hf_folder(path):
        model, tokenizer = load_hf_gpt2(path, device, dtype or torch.float32, **config_overrides)
        return Pretrained(model, tokenizer, None, f"Hugging Face GPT-2 folder {path}")
    ckpt = load_checkpoint(path)
    model = ckpt.model(device, **config_overrides)
    if dtype is not None:
        model = model.to(dtype)
    template = PromptTemplate.from_meta(ckpt.meta, str(ckpt.path / "minillm.json"))
    return Pretrained(model, ckpt.tokenizer(), template, f"minillm checkpoint {ckpt.path} (step {ckpt.step})")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in ("export", "import"):
        print(__doc__.split("Command line:")[1].rstrip(), file=sys.stderr)
        raise SystemExit(2)
    command, src, dst = argv
    try:
        if command == "export":
            pretrained = load_pretrained(src)
            out = export_hf_gpt2(pretrained.model, dst, pretrained.tokenizer)
            print(f"exported {pretrained.source} -> {out} ({pretrained.model.num_params():,} parameters)")
        else:
            model, tokenizer = load_hf_gpt2(src)
            writers = {} if tokenizer is None else {TOKENIZER_FILE: tokenizer.save}
            out = save_checkpoint(dst, 0, model, writers=writers)
            print(f"imported {src} -> {out} ({model.num_params():,} parameters)")
    except (OSError, ValueError) as err:
        raise SystemExit(f"python -m minillm.hf {command}: error: {err}") from None


if __name__ == "__main__":
    main()
