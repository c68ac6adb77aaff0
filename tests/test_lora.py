"""LoRA: the adapted model equals the base at initialisation, merged equals unmerged, the trainable
parameter count is what the rank predicts, adapters save on their own, checkpoints load merged."""

import pytest
import torch

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import GPTConfig
from minillm.lora import (ADAPTERS_FILE, TARGETS, LoRAConfig, LoRALinear, adapter_tensors, add_lora, has_lora,
                          load_adapters, lora_parameter_count, merge_lora, save_adapters)
from minillm.model import GPT

CONFIG = GPTConfig(vocab_size=97, block_size=24, n_layer=3, n_head=2, n_embd=20, mlp_ratio=3, impl="torch")


def model(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG.__dict__, **overrides})).to(dtype).eval()


def randomise_adapters(m, seed=1):
    """Training would move B away from zero; so does this, so the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in m.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g, dtype=module.lora_B.dtype) * 0.3)


def test_adapted_model_equals_base_at_initialisation():
    base = model()
    adapted = model()
    names = add_lora(adapted, LoRAConfig(lora_rank=4, lora_alpha=8.0))
    assert len(names) == CONFIG.n_layer * len(TARGETS)
    idx = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(adapted(idx)[0], base(idx)[0])  # B = 0: exactly, not just closely
    assert any(m.lora_A.abs().sum() > 0 for m in adapted.modules() if isinstance(m, LoRALinear))


@pytest.mark.parametrize("targets", [TARGETS, ("attn.c_attn",), ("mlp.c_fc", "attn.c_proj")])
@pytest.mark.parametrize("rank", [1, 5])
def test_trainable_parameter_count_is_what_the_rank_predicts(targets, rank):
    m = model(dtype=torch.float32)
    add_lora(m, LoRAConfig(lora_rank=rank, lora_targets=targets))
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    # by hand: rank * (in + out) for each adapted projection; C = 20, hidden = 3 * 20
    per_block = {"attn.c_attn": 20 + 60, "attn.c_proj": 20 + 20, "mlp.c_fc": 20 + 60, "mlp.c_proj": 60 + 20}
    expected = CONFIG.n_layer * rank * sum(per_block[t] for t in targets)
    assert trainable == expected == lora_parameter_count(CONFIG.n_layer, CONFIG.n_embd, CONFIG.mlp_ratio,
                                                         LoRAConfig(lora_rank=rank, lora_targets=targets))
    # GPT-2 small, all four targets, rank 8: 16 * r * C * n_layer
    assert lora_parameter_count(12, 768, 4, LoRAConfig(lora_rank=8)) == 16 * 8 * 768 * 12 == 1_179_648


def test_only_adapters_get_gradients():
    m = model(dtype=torch.float32)
    add_lora(m, LoRAConfig(lora_rank=2))
    randomise_adapters(m)
    idx = torch.randint(0, 97, (2, 10))
    m.train()
    m(idx, idx)[1].backward()
    for name, p in m.named_parameters():
        is_adapter = name.endswith((".lora_A", ".lora_B"))
        assert p.requires_grad == is_adapter, name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == is_adapter, name


@pytest.mark.parametrize("bias", [True, False])
def test_merged_model_gives_the_same_outputs_as_unmerged(bias):
    m = model(bias=bias)
    add_lora(m, LoRAConfig(lora_rank=3, lora_alpha=5.0, lora_dropout=0.2))  # dropout: inactive in eval mode
    randomise_adapters(m)
    m.eval()
    idx = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    unmerged = m(idx)[0]
    assert not torch.allclose(unmerged, model(bias=bias)(idx)[0], atol=1e-3)  # the adapters do change the outputs
    assert merge_lora(m) == CONFIG.n_layer * 4
    assert not has_lora(m) and not any("lora" in n for n in m.state_dict())
    assert set(m.state_dict()) == set(model(bias=bias).state_dict())  # GPT's names, nothing else
    torch.testing.assert_close(m(idx)[0], unmerged, rtol=1e-10, atol=1e-10)


def test_adapters_saved_on_their_own_restore_the_finetuned_model(tmp_path):
    tuned = model()
    config = LoRAConfig(lora_rank=2, lora_targets=("attn.c_attn", "mlp.c_proj"))
    add_lora(tuned, config)
    randomise_adapters(tuned)
    path = tmp_path / ADAPTERS_FILE
    save_adapters(tuned, config, path, base="somewhere/base")
    saved = adapter_tensors(tuned)
    assert set(saved) == {n for n in tuned.state_dict() if "lora_" in n}  # adapters only, no base weight
    fresh = model()  # the same base weights, no adapters yet
    assert load_adapters(fresh, path) == config
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(fresh(idx)[0], tuned(idx)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        load_adapters(model(n_embd=24, n_head=2), path)


def test_lora_checkpoint_loads_as_a_merged_gpt(tmp_path):
    m = model(dtype=torch.float32)
    config = LoRAConfig(lora_rank=4)
    add_lora(m, config)
    randomise_adapters(m)
    save_checkpoint(tmp_path / "run", 5, m, configs={"lora": config})
    loaded = load_checkpoint(tmp_path / "run").model()
    assert type(loaded) is GPT and not has_lora(loaded)
    idx = torch.randint(0, 97, (2, 11))
    torch.testing.assert_close(loaded(idx)[0], m(idx)[0], rtol=1e-5, atol=1e-5)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAConfig(lora_rank=0)
    with pytest.raises(ValueError, match="lora_targets"):
        LoRAConfig(lora_targets=("attn.c_q",))
    m = model()
    add_lora(m, LoRAConfig())
    with pytest.raises(ValueError, match="already has"):
        add_lora(m, LoRAConfig())
