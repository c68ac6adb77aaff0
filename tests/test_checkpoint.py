"""Checkpoints: exact round trip, atomic saves that survive a crash, keep-last, clear errors."""

import json

import pytest
import torch

from minillm.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT

CONFIG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CONFIG.__dict__, **overrides}))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_round_trip_is_exact(tmp_path, tie_embeddings):
    model = make_model(tie_embeddings=tie_embeddings)
    folder = save_checkpoint(tmp_path, 7, model, configs={"extra": {"lr": 0.1}},
                             json_files={"state.json": {"a": [1, 2]}},
                             tensors={"opt.safetensors": {"m": torch.arange(3.0)}})
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == folder and ckpt.step == 7 and ckpt.meta["extra"] == {"lr": 0.1}
    assert ckpt.json("state.json") == {"a": [1, 2]}
    assert torch.equal(ckpt.tensors("opt.safetensors")["m"], torch.arange(3.0))
    loaded = ckpt.model()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie_embeddings
    stored = ckpt.tensors()
    assert ("lm_head.weight" in stored) == (not tie_embeddings)  # a tied head is stored once
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], loaded(idx)[0])


def test_config_overrides_on_load(tmp_path):
    save_checkpoint(tmp_path, 1, make_model())
    assert load_checkpoint(tmp_path).model(impl="torch").config.impl == "torch"


def test_crash_during_save_leaves_previous_checkpoint_whole(tmp_path):
    save_checkpoint(tmp_path, 100, make_model(seed=1))

    def crash(path):
        path.write_text("half")
        raise KeyboardInterrupt("simulated crash mid-save")

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 200, make_model(seed=2), writers={"tokenizer.txt": crash})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000100"]
    assert load_checkpoint(tmp_path).step == 100
    assert any(p.name.startswith(".ckpt-00000200.tmp") for p in tmp_path.iterdir())  # the debris
    save_checkpoint(tmp_path, 300, make_model(seed=3))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # cleaned by the next save
    assert load_checkpoint(tmp_path).step == 300


def test_keep_last_and_newest_by_step(tmp_path):
    for step in (5, 50, 500, 1000):  # numeric order, not string order
        save_checkpoint(tmp_path, step, make_model(), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000500", "ckpt-00001000"]
    assert find_checkpoint(tmp_path).name == "ckpt-00001000"
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        save_checkpoint(tmp_path, 2000, make_model(), keep_last=0)


def test_resaving_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 10, make_model(seed=1))
    save_checkpoint(tmp_path, 10, make_model(seed=2))
    expected = make_model(seed=2).transformer.wte.weight
    assert torch.equal(load_checkpoint(tmp_path).model().transformer.wte.weight, expected)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no minillm.json"):
        load_checkpoint(tmp_path)
    folder = save_checkpoint(tmp_path, 1, make_model())
    meta = json.loads((folder / "minillm.json").read_text())
    (folder / "minillm.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ValueError, match="checkpoint version 99 is not supported"):
        load_checkpoint(folder)
    (folder / "minillm.json").write_text(json.dumps({**meta, "model": {**meta["model"], "n_head": 3}}))
    with pytest.raises(ValueError, match="must be divisible by n_head"):
        load_checkpoint(folder).model()
    (folder / "minillm.json").write_text("{not json")
    with pytest.raises(ValueError, match="minillm.json: not valid JSON"):
        load_checkpoint(folder)
