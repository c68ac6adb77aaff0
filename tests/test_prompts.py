"""The instruction prompt template: its exact text, conversations, and the trip through checkpoint metadata."""

import pytest

from minillm.checkpoint import load_checkpoint, save_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.prompts import META_KEY, PromptTemplate

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_alpaca_prompt_written_out():
    """The Alpaca layout the shared instruction data uses, typed out by hand."""
    template = PromptTemplate()
    assert template.render("Rewrite in passive voice.", "The cat chased the mouse.") == (
        PREAMBLE + "\n\n### Instruction:\nRewrite in passive voice.\n\n### Input:\nThe cat chased the mouse.\n\n### Response:\n"
    )
    assert template.render("Name a prime.") == PREAMBLE + "\n\n### Instruction:\nName a prime.\n\n### Response:\n"
    prompt, full = template.render_example("Name a prime.", "", "7")
    assert full == prompt + "7" and prompt == template.render("Name a prime.")


def test_conversation_repeats_the_blocks_oldest_first():
    template = PromptTemplate(preamble="")
    text = template.render_conversation([("Hi.", "Hello!"), ("Count to 2.", "1, 2")], "And to 3?")
    assert text == ("### Instruction:\nHi.\n\n### Response:\nHello!\n\n### Instruction:\nCount to 2.\n\n"
                    "### Response:\n1, 2\n\n### Instruction:\nAnd to 3?\n\n### Response:\n")
    assert template.render_conversation([], "Hi.") == template.render("Hi.")


def test_stop_strings_are_the_headers_after_a_separator():
    assert PromptTemplate().stop_strings() == ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:")


def test_template_travels_in_checkpoint_metadata(tmp_path):
    template = PromptTemplate(response_header="### Answer:", separator="\n")
    model = GPT(GPTConfig.from_preset("tiny", n_layer=1))
    save_checkpoint(tmp_path, 1, model, configs={META_KEY: template})
    ckpt = load_checkpoint(tmp_path)
    assert PromptTemplate.from_meta(ckpt.meta) == template
    save_checkpoint(tmp_path / "plain", 1, model)
    assert PromptTemplate.from_meta(load_checkpoint(tmp_path / "plain").meta) is None
    with pytest.raises(ValueError, match=r"\[prompt_template\]: unknown PromptTemplate field\(s\) colour"):
        PromptTemplate.from_meta({META_KEY: {"colour": "red"}})


@pytest.mark.parametrize("field", ["instruction_header", "input_header", "response_header", "separator"])
def test_empty_pieces_are_rejected(field):
    with pytest.raises(ValueError, match=f"PromptTemplate.{field} must be a non-empty string"):
        PromptTemplate(**{field: ""})
