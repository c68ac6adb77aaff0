"""The instruction prompt template: how an instruction (and an optional input) becomes the text an
instruction-finetuned model reads, and where its answer starts.

Alpaca's format (Taori et al. 2023, the one the shared instruction data is written for):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    Rewrite the sentence in passive voice.

    ### Input:
    The cat chased the mouse.

    ### Response:
    The mouse was chased by the cat.

The `### Input:` block is left out when the input is empty. A model learns this layout during
finetuning, so sampling must render prompts exactly the same way: finetuning stores the template it
trained with in the checkpoint's metadata (`minillm.json`, under "prompt_template"), and sample.py's
interactive mode and the server's chat route read it back with `PromptTemplate.from_meta`.

A conversation is the same blocks repeated, oldest first: each earlier instruction with the
model's response, then the new instruction and an open `### Response:` for the model to complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from minillm import cli

META_KEY = "prompt_template"  # where a checkpoint's minillm.json keeps the template


@dataclass
class PromptTemplate:
    """The pieces of an Alpaca-style prompt; change them to finetune on another layout."""

    preamble: str = (  # opening line, before the first block ("" = none)
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    instruction_header: str = "### Instruction:"  # line above the instruction
    input_header: str = "### Input:"  # line above the optional input (the block is left out when it is empty)
    response_header: str = "### Response:"  # line above the response: generation starts after it
    separator: str = "\n\n"  # between the preamble and the blocks

    def __post_init__(self) -> None:
        for name in ("instruction_header", "input_header", "response_header", "separator"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"PromptTemplate.{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.preamble, str):
            raise ValueError(f"PromptTemplate.preamble must be a string, got {self.preamble!r}")

    def _blocks(self, instruction: str, input: str = "") -> list[str]:
        blocks = [f"{self.instruction_header}\n{instruction}"]
        if input:
            blocks.append(f"{self.input_header}\n{input}")
        return blocks

    def render(self, instruction: str, input: str = "") -> str:
        """The prompt for one instruction, ending with the response header and a newline: the model
        writes its response right after it."""
        return self.render_conversation([], instruction, input)

    def render_example(self, instruction: str, input: str, output: str) -> tuple[str, str]:
        """(prompt, prompt + output): the text a finetuning example trains on, and the prompt part
        of it (whose tokens the loss skips when only the response is learned)."""
        prompt = self.render(instruction, input)
        return prompt, prompt + output

    def render_conversation(self, history: list[tuple[str, str]], instruction: str, input: str = "") -> str:
        """The prompt for `instruction` after earlier (instruction, response) turns, oldest first."""
        blocks = [self.preamble] if self.preamble else []
        for past_instruction, past_response in history:
            blocks += self._blocks(past_instruction)
            blocks.append(f"{self.response_header}\n{past_response}")
        blocks += self._blocks(instruction, input)
        blocks.append(f"{self.response_header}\n")
        return self.separator.join(blocks)

    def stop_strings(self) -> tuple[str, ...]:
        """Where a response is over if the model runs on into a new block: the headers, each after a
        separator. Pass them as `SamplingConfig.stop` (the model's <|endoftext|> also stops it)."""
        return tuple(self.separator + h for h in (self.instruction_header, self.input_header, self.response_header))

    def to_dict(self) -> dict[str, Any]:
        return cli.to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "prompt template") -> "PromptTemplate":
        return cli.from_dict(cls, data, source=source)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str = "checkpoint metadata") -> "PromptTemplate | None":
        """The template stored in a checkpoint's metadata (`Checkpoint.meta`), or None if it has none."""
        data = meta.get(META_KEY)
        return None if data is None else cls.from_dict(data, source=f"{source} [{META_KEY}]")
