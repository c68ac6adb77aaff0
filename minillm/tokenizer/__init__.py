"""A byte-level BPE tokenizer, written from scratch: trains fast, encodes GPT-2 text exactly like
tiktoken, refuses special tokens smuggled in as text, streams decoded text character by character.

    from minillm.tokenizer import Tokenizer
    tok = Tokenizer.train(open("../shared/data/tinyshakespeare.txt").read(), vocab_size=4096)
    ids = tok.encode("To be, or not to be")         # [...]
    tok.decode(ids)                                 # 'To be, or not to be'
    tok.save("tokenizer.bpe"); tok = Tokenizer.load("tokenizer.bpe")
    gpt2 = Tokenizer.from_gpt2_files("../shared/data/encoder.json", "../shared/data/vocab.bpe")

The modules, in reading order:
    pretokenize.py  the split patterns (GPT-2, GPT-4) that cut text into chunks before BPE
    bpe.py          BPE on one chunk, as pure functions
    train.py        learning the merges: chunk counts, pair index, lazy heap
    core.py         the Tokenizer: encode (chunk cache, special tokens), decode, streaming decode
    bpe_file.py     our own file format, tokenizer.bpe
    formats.py      GPT-2, tiktoken and Hugging Face files; a vocabulary dump
    parallel.py     worker processes for training and batch encoding
    __main__.py     the command line: python -m minillm.tokenizer train|encode|decode|stats|vocab|export
"""

from minillm.tokenizer.core import EOT, TOKENIZER_FILE, IncrementalDecoder, Tokenizer
from minillm.tokenizer.bpe_file import TokenizerFileError
from minillm.tokenizer.formats import open_tokenizer
from minillm.tokenizer.pretokenize import CL100K_PATTERN, GPT2_PATTERN, PATTERNS

__all__ = [
    "CL100K_PATTERN",
    "EOT",
    "GPT2_PATTERN",
    "IncrementalDecoder",
    "PATTERNS",
    "TOKENIZER_FILE",
    "Tokenizer",
    "TokenizerFileError",
    "open_tokenizer",
]
