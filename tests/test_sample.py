"""sample.py: what it prints equals what the library generates, for each way of giving a prompt, for
a minillm checkpoint and the same model exported as a Hugging Face folder, and in interactive mode."""

import io
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import sample
from minillm.checkpoint import save_checkpoint
from minillm.config import GPTConfig
from minillm.generate import SamplingConfig, generate
from minillm.hf import export_hf_gpt2
from minillm.model import GPT
from minillm.prompts import META_KEY, PromptTemplate
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer
from tests.conftest import REPO_ROOT

TEXT = "To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. 🙂 café\n" * 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random model with a tokenizer, saved three ways: a run, a run with a template, an HF folder."""
    root = tmp_path_factory.mktemp("sample")
    tokenizer = Tokenizer.train(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=512, n_layer=2, n_head=2, n_embd=16, impl="torch")).eval()
    save_checkpoint(root / "run", 10, model, writers={TOKENIZER_FILE: tokenizer.save})
    template = PromptTemplate()
    save_checkpoint(root / "instruct", 10, model, configs={META_KEY: template}, writers={TOKENIZER_FILE: tokenizer.save})
    export_hf_gpt2(model, root / "hf", tokenizer)
    return root, model, tokenizer, template


def expected(model, tokenizer, prompt, **settings):
    return generate(model, [prompt], SamplingConfig(**settings), tokenizer=tokenizer)[0].text


def run_main(argv, capsys, stdin=""):
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)  # not a terminal: sample.py reads a prompt from it when none is given
    try:
        sample.main(argv)
    finally:
        sys.stdin = old
    return capsys.readouterr()


SETTINGS = ["--max_new_tokens", "12", "--seed", "5", "--top_k", "20"]


@pytest.mark.parametrize("folder", ["run", "hf"])
def test_prompt_argument_streams_what_generate_makes(setup, capsys, folder):
    root, model, tokenizer, _ = setup
    out = run_main(["--ckpt", str(root / folder), "--prompt", "To be", *SETTINGS], capsys)
    assert out.out == "To be" + expected(model, tokenizer, "To be", max_new_tokens=12, seed=5, top_k=20) + "\n"
    assert "[seed 5 | 12 tokens in" in out.err and "stopped: length" in out.err


def test_prompt_file_stdin_and_several_samples(setup, capsys, tmp_path):
    root, model, tokenizer, _ = setup
    (tmp_path / "p.txt").write_text("Whether", encoding="utf-8")
    out = run_main(["--ckpt", str(root / "run"), "--prompt-file", str(tmp_path / "p.txt"), "--no-echo", *SETTINGS], capsys)
    assert out.out == expected(model, tokenizer, "Whether", max_new_tokens=12, seed=5, top_k=20) + "\n"
    piped = run_main(["--ckpt", str(root / "run"), "--no-echo", *SETTINGS], capsys, stdin="Whether")
    assert piped.out == out.out
    batch = run_main(["--ckpt", str(root / "run"), "--prompt", "To", "--num-samples", "2", "--no-stream", *SETTINGS], capsys)
    streamed = run_main(["--ckpt", str(root / "run"), "--prompt", "To", "--num-samples", "2", *SETTINGS], capsys)
    assert batch.out == streamed.out  # sample i uses seed + i either way
    second = expected(model, tokenizer, "To", max_new_tokens=12, seed=6, top_k=20)
    assert batch.out.endswith("---------- sample 2 of 2 ----------\nTo" + second + "\n")


def test_stop_strings_take_escapes(setup, capsys):
    root, model, tokenizer, _ = setup
    out = run_main(["--ckpt", str(root / "run"), "--prompt", "a", "--no-echo", "--stop", "\\n,e", *SETTINGS], capsys)
    assert out.out == expected(model, tokenizer, "a", max_new_tokens=12, seed=5, top_k=20, stop=("\n", "e")) + "\n"


def test_interactive_mode_keeps_the_conversation_in_the_template(setup, capsys):
    root, model, tokenizer, template = setup
    out = run_main(["--ckpt", str(root / "instruct"), "--interactive", *SETTINGS], capsys, stdin="Hi.\nAgain?\n/quit\n")
    config = SamplingConfig(max_new_tokens=12, seed=5, top_k=20, stop=template.stop_strings())
    first = generate(model, [template.render("Hi.")], config, tokenizer=tokenizer)[0].text
    second = generate(model, [template.render_conversation([("Hi.", first.strip())], "Again?")],
                      replace(config, seed=6), tokenizer=tokenizer)[0].text
    assert out.out == f">>> {first}\n>>> {second}\n>>> \n"
    assert "instruction mode" in out.err


def test_interactive_mode_drops_the_oldest_turns_when_the_context_is_full(setup, capsys, tmp_path):
    """A block that holds each question alone with room for 12 new tokens, but not with history."""
    _, _, tokenizer, template = setup
    block = max(len(tokenizer.encode(template.render(q))) for q in ("Hi.", "Again?")) + 12
    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=16, impl="torch")).eval()
    save_checkpoint(tmp_path / "small", 1, model, configs={META_KEY: template}, writers={TOKENIZER_FILE: tokenizer.save})
    out = run_main(["--ckpt", str(tmp_path / "small"), "--interactive", *SETTINGS], capsys, stdin="Hi.\nAgain?\n")
    config = SamplingConfig(max_new_tokens=12, seed=6, top_k=20, stop=template.stop_strings())
    second = generate(model, [template.render("Again?")], config, tokenizer=tokenizer)[0].text
    assert out.out.endswith(f">>> {second}\n>>> \n")


def test_interactive_mode_keeps_the_conversation_when_max_new_tokens_fills_the_block(setup, capsys, monkeypatch):
    """max_new_tokens = block (as the default 256 is on a 256-token model): history is still kept.
    The prompts sample.py generates from are recorded on their way to the real run_one."""
    root, model, tokenizer, template = setup
    prompts, real_run_one = [], sample.run_one
    monkeypatch.setattr(sample, "run_one", lambda pretrained, prompt, *a, **k: prompts.append(prompt) or real_run_one(pretrained, prompt, *a, **k))
    run_main(["--ckpt", str(root / "instruct"), "--interactive", "--max_new_tokens", "512", "--seed", "5",
              "--stop", "e,o,a"], capsys, stdin="Hi.\nAgain?\n")  # short answers: the history fits
    assert len(prompts) == 2 and prompts[0] == template.render("Hi.")
    assert prompts[1].startswith(prompts[0]) and prompts[1].endswith(template.render("Again?")[-40:])


def test_interactive_mode_without_a_template_continues_each_line(setup, capsys):
    root, model, tokenizer, _ = setup
    out = run_main(["--ckpt", str(root / "run"), "--interactive", *SETTINGS], capsys, stdin="To be\n/reset\n")
    assert out.out.startswith(">>> To be" + expected(model, tokenizer, "To be", max_new_tokens=12, seed=5, top_k=20) + "\n")
    assert "no prompt template" in out.err


def test_errors(setup, tmp_path, capsys):
    root, model, _, _ = setup
    with pytest.raises(SystemExit, match="--ckpt is required"):
        sample.main([])
    with pytest.raises(SystemExit, match="no minillm checkpoint at"):
        sample.main(["--ckpt", str(tmp_path / "nothing")])
    save_checkpoint(tmp_path / "bare", 1, model)
    with pytest.raises(SystemExit, match="has no tokenizer"):
        sample.main(["--ckpt", str(tmp_path / "bare")])


def test_runs_as_a_script_with_piped_input(setup):
    root, _, _, _ = setup
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), "--ckpt", str(root / "hf"), "--max_new_tokens", "5",
                           "--seed", "1"], input="To be", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("To be") and "[seed 1 | 5 tokens" in done.stderr
