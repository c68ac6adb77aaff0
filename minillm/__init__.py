"""minillm: the build-your-own-LLM pipeline, from scratch and small enough to read.

corpus -> BPE tokenizer -> GPT pretraining -> evaluation -> finetuning -> sampling -> serving.
Importing the package has no side effects; import the module you need (`minillm.model`, ...).
"""

from minillm.config import GPTConfig
from minillm.model import GPT

__all__ = ["GPT", "GPTConfig"]
__version__ = "0.1.0"
