"""GPT-2 in Hugging Face's layout: export and import round trips, the variants of old files, clear
errors, and (with transformers installed) logits that match transformers' GPT2LMHeadModel both ways."""

import json

import pytest
import torch

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import GPTConfig
from minillm.hf import (
    export_hf_gpt2,
    is_hf_folder,
    load_hf_gpt2,
    load_pretrained,
    main,
    state_to_hf,
)
from minillm.model import GPT
from minillm.safetensors import load_file, save_file

TINY = GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=2, n_embd=16, impl="torch")


def random_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():  # LayerNorms and biases away from 1 and 0, so a mix-up would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_model(a: GPT, b: GPT) -> None:
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    assert (b.lm_head.weight is b.transformer.wte.weight) == b.config.tie_embeddings


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "mlp_ratio": 3, "dropout": 0.1, "layer_norm_eps": 1e-6}])
def test_export_then_import_gives_the_identical_model(tmp_path, overrides):
    model = random_model(GPTConfig(**{**TINY.__dict__, **overrides}))
    export_hf_gpt2(model, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert is_hf_folder(tmp_path / "hf")
    imported, tokenizer = load_hf_gpt2(tmp_path / "hf", impl="torch")
    assert tokenizer is None
    assert_same_model(model, imported)


def test_import_reads_old_layouts_bin_files_and_shards(tmp_path):
    """Names without `transformer.`, the stored attention-mask buffers, an explicit tied lm_head, as in
    OpenAI's original upload; as pytorch_model.bin (weights_only) and as two safetensors shards."""
    model = random_model()
    export_hf_gpt2(model, tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    old = {name.removeprefix("transformer."): t for name, t in state.items()}
    for i in range(TINY.n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    old["lm_head.weight"] = old["wte.weight"].clone()
    for folder in ("bin", "sharded"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save(old, tmp_path / "bin" / "pytorch_model.bin")
    names = sorted(old)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, members in shards.items():
        save_file({n: old[n].contiguous() for n in members}, tmp_path / "sharded" / shard)
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for folder in ("bin", "sharded"):
        imported, _ = load_hf_gpt2(tmp_path / folder, impl="torch")
        assert_same_model(model, imported)


@pytest.mark.parametrize("field,value,match", [
    ("activation_function", "gelu", "activation_function='gelu' is not supported: minillm's MLP uses the tanh GELU"),
    ("scale_attn_by_inverse_layer_idx", True, "no per-layer attention scaling"),
    ("n_inner", 40, r"multiple of n_embd \(16\)"),
    ("model_type", "llama", "only GPT-2"),
    ("n_head", 3, "n_embd \\(16\\) must be divisible by n_head \\(3\\)"),
])
def test_import_names_the_config_field_it_cannot_represent(tmp_path, field, value, match):
    export_hf_gpt2(random_model(), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(ValueError, match=match) as err:
        load_hf_gpt2(tmp_path / "hf")
    assert str(path) in str(err.value)


def test_import_and_export_errors(tmp_path):
    export_hf_gpt2(random_model(), tmp_path / "hf")
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf_gpt2(random_model(), tmp_path / "hf")
    with pytest.raises(ValueError, match="bias=False"):
        export_hf_gpt2(GPT(GPTConfig(**{**TINY.__dict__, "bias": False})), tmp_path / "nobias")
    assert not (tmp_path / "nobias").exists()
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_embd": 32, "n_head": 2}))
    with pytest.raises(ValueError, match=r"does not fit its config: .*wrong shape \['transformer.wte.weight \(61, 16\) != \(61, 32\)"):
        load_hf_gpt2(tmp_path / "hf")


def test_load_pretrained_and_the_command_line(tmp_path, capsys):
    model = random_model()
    save_checkpoint(tmp_path / "run", 5, model)
    main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert "exported minillm checkpoint" in capsys.readouterr().out
    main(["import", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert "imported" in capsys.readouterr().out
    for path in (tmp_path / "run", tmp_path / "hf", tmp_path / "back"):
        loaded = load_pretrained(path, impl="torch")
        assert_same_model(model, loaded.model)
        assert loaded.template is None and str(path) in loaded.source
    assert load_checkpoint(tmp_path / "back").step == 0
    with pytest.raises(SystemExit, match="export: error: .*already exists"):
        main(["export", str(tmp_path / "run"), str(tmp_path / "hf")])


# ---- against Hugging Face transformers (an optional test dependency) ----


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="transformers is not installed: no reference GPT-2 to compare logits with")


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_gpt2_imports_with_the_same_logits(tmp_path, transformers, tied):
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     n_inner=48, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "hf")
    ours, _ = load_hf_gpt2(tmp_path / "hf", impl="torch")
    assert ours.config.mlp_ratio == 3 and ours.config.tie_embeddings == tied
    idx = torch.randint(0, 61, (3, 16))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(reference, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_our_export_loads_in_transformers_and_safetensors_with_the_same_logits(tmp_path, transformers, tied):
    model = random_model(GPTConfig(**{**TINY.__dict__, "tie_embeddings": tied}), seed=2)
    export_hf_gpt2(model, tmp_path / "hf")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 61, (3, 16))
    torch.testing.assert_close(logits_of(reference, idx), logits_of(model, idx), atol=1e-5, rtol=0)
    safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed")
    theirs = safetensors.load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = state_to_hf(model)
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], expected[k]) for k in theirs)


# ---- tokenizer files ----

TOKENIZER_TEXT = ("I HAD always thought Jack Gisburn rather a cheap genius. " * 5 + "héllo wörld 日本語 🙂🙃 "
                  + "DON'T WON'T CAN'T " * 30 + "1234567 7654321 " * 20)
PROBES = ["héllo 日本 🙂  the  genius\n\n  x", "I DON'T know 1234567", "a<|endoftext|>b<|pad|>", TOKENIZER_TEXT[:500]]


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_tokenizer_travels_with_the_folder(tmp_path, transformers, pattern):
    """Exported with the model, read back equal; and transformers' AutoTokenizer splits and merges
    exactly as ours, also for a split pattern that is not GPT-2's (cl100k's: "'T" is one chunk there)."""
    from minillm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(TOKENIZER_TEXT, vocab_size=320, pattern=pattern, special_tokens=("<|endoftext|>", "<|pad|>"))
    model = random_model(GPTConfig(**{**TINY.__dict__, "vocab_size": tokenizer.vocab_size}))
    export_hf_gpt2(model, tmp_path / "hf", tokenizer)
    imported, back = load_hf_gpt2(tmp_path / "hf", impl="torch")
    assert back == tokenizer and load_pretrained(tmp_path / "hf").tokenizer == tokenizer
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == tokenizer.eot_id
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token_id == tokenizer.eot_id
    for text in PROBES:
        ids = tokenizer.encode(text, allowed_special="all")
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == text


def test_an_unreadable_tokenizer_json_falls_back_to_the_gpt2_files(tmp_path):
    from minillm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(TOKENIZER_TEXT, vocab_size=300)
    export_hf_gpt2(random_model(GPTConfig(**{**TINY.__dict__, "vocab_size": tokenizer.vocab_size})), tmp_path / "hf", tokenizer)
    path = tmp_path / "hf" / "tokenizer.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "normalizer": {"type": "NFC"}}))
    with pytest.warns(UserWarning, match="reading vocab.json \\+ merges.txt instead"):
        assert load_hf_gpt2(tmp_path / "hf")[1] == tokenizer
    (tmp_path / "hf" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        load_hf_gpt2(tmp_path / "hf")


def test_gpt2_tokenizer_files_round_trip_through_an_export(tmp_path, transformers, shared_data):
    """GPT-2's own vocabulary (shared data) in a folder with a small model: transformers reads our
    vocab.json/merges.txt/tokenizer.json and tokenizes a real text exactly as we do."""
    from minillm.tokenizer import Tokenizer

    gpt2 = Tokenizer.from_gpt2_files(shared_data / "encoder.json", shared_data / "vocab.bpe")
    model = random_model(GPTConfig(vocab_size=gpt2.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=4))
    export_hf_gpt2(model, tmp_path / "hf", gpt2)
    _, back = load_hf_gpt2(tmp_path / "hf")
    assert back == gpt2
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:4000]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.encode(text) == gpt2.encode(text)
