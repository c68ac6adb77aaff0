"""minillm: the build-your-own-LLM pipeline, from scratch and small enough to read.

corpus -> BPE tokenizer -> GPT pretraining -> evaluation -> finetuning -> sampling -> serving.
Importing the package has no side effects and does not import torch: `minillm.GPT` and
`minillm.GPTConfig` are loaded on first use, so torch-free tools (`python -m minillm.tokenizer`)
start fast. Import the module you need (`minillm.model`, ...).
"""

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "GPT":
        from minillm.model import GPT

        return GPT
    if name == "GPTConfig":
        from minillm.config import GPTConfig

        return GPTConfig
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
