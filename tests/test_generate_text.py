"""Generation with a tokenizer: streamed text never splits a character, stop strings cut the text
(and nothing of them leaks out while streaming), <|endoftext|> stops, a padded vocabulary is never
sampled past the tokenizer's end."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.config import GPTConfig
from minillm.generate import SamplingConfig, TextStream, generate, stream
from minillm.model import GPT
from minillm.tokenizer import Tokenizer

# multibyte on purpose: accents (2 bytes), CJK (3), emoji (4), so tokens split characters' bytes
TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. " * 20 + "héllo wörld café naïve " * 10
              + "日本語のテキスト 漢字 " * 10 + "🙂🙃🎉 emoji 🙂 " * 10 + "\n\nA new paragraph.\n" * 10)
ALPHABET = "ab \n.é日本🙂🎉x"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TRAIN_TEXT, vocab_size=300)


def text_model(tokenizer, seed=0, extra_vocab=0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size + extra_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16, impl="torch")
    return GPT(config).eval()


def always(model: GPT, token: int) -> GPT:
    """Make `token` the model's top choice everywhere: the final hidden state is a constant vector c
    (ln_f weight 0, bias c), and only the head row of `token` is c, so its logit |c|^2 beats every 0."""
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[token] = 1.0
    return model


@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_streamed_text_is_whole_characters_and_adds_up(tokenizer, text):
    ids = tokenizer.encode(text)
    pieces = TextStream(tokenizer)
    out = [pieces.push(t) for t in ids] + [pieces.finish()]
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)  # no character was ever cut in two


@given(text=st.text(alphabet=ALPHABET, max_size=40), cut=st.data())
def test_stop_strings_cut_the_text_and_never_leak(tokenizer, text, cut):
    """The stop string is a piece of the text itself: the output is everything before its first
    occurrence, and since every released piece is part of the output, no part of it leaked early."""
    if len(text) < 2:
        return
    begin = cut.draw(st.integers(0, len(text) - 2))
    stop = text[begin : begin + cut.draw(st.integers(1, min(4, len(text) - begin)))]
    pieces = TextStream(tokenizer, [stop, "never-there"])
    out = []
    for t in tokenizer.encode(text):
        out.append(pieces.push(t))
        if pieces.stopped:
            break
    out.append(pieces.finish())
    assert "".join(out) == text[: text.index(stop)] and pieces.stopped


def test_held_back_text_is_released_when_it_cannot_be_a_stop_string(tokenizer):
    pieces = TextStream(tokenizer, ["\n\n###"])
    released = "".join(pieces.push(t) for t in tokenizer.encode("one") + tokenizer.encode("\n\n"))
    assert released == "one"  # "\n\n" may be the start of "\n\n###": held back
    released += "".join(pieces.push(t) for t in tokenizer.encode("two"))
    assert released == "one\n\ntwo"  # "\n\nt" is not: released
    assert pieces.finish() == "" and not pieces.stopped


def test_generate_text_matches_its_tokens_and_the_stream(tokenizer):
    model = text_model(tokenizer)
    config = SamplingConfig(max_new_tokens=20, seed=7, stop_at_eot=False)
    [completion] = generate(model, ["héllo 🙂"], config, tokenizer=tokenizer)
    assert completion.prompt_tokens == tokenizer.encode("héllo 🙂")
    assert completion.text == tokenizer.decode(completion.tokens)
    assert "".join(stream(model, "héllo 🙂", config, tokenizer=tokenizer)) == completion.text


def test_a_stop_string_from_the_free_text_cuts_it_there(tokenizer):
    model = text_model(tokenizer, seed=1)
    config = SamplingConfig(max_new_tokens=24, temperature=0, stop_at_eot=False)
    free = generate(model, ["the"], config, tokenizer=tokenizer)[0].text
    stop = free[6:9]
    [cut] = generate(model, ["the"], SamplingConfig(**{**config.__dict__, "stop": (stop,)}), tokenizer=tokenizer)
    assert cut.text == free[: free.index(stop)] and cut.finish_reason == "stop"


def test_endoftext_stops_and_starts_a_sample(tokenizer):
    model = always(text_model(tokenizer), tokenizer.eot_id)
    [stopped] = generate(model, ["abc"], SamplingConfig(max_new_tokens=5), tokenizer=tokenizer)
    assert stopped.tokens == [] and stopped.text == "" and stopped.finish_reason == "stop"
    [going] = generate(model, [""], SamplingConfig(max_new_tokens=3, stop_at_eot=False), tokenizer=tokenizer)
    assert going.prompt_tokens == [tokenizer.eot_id] and going.tokens == [tokenizer.eot_id] * 3


def test_ids_past_the_tokenizer_are_never_sampled(tokenizer):
    """A model vocabulary padded past the tokenizer's (e.g. 50304 for GPT-2's 50257): even when the
    model loves a padding id, generation picks among ids the tokenizer can decode."""
    model = always(text_model(tokenizer, extra_vocab=5), tokenizer.vocab_size + 2)
    for config in (SamplingConfig(temperature=0, max_new_tokens=4), SamplingConfig(max_new_tokens=4, seed=0)):
        [c] = generate(model, ["x"], config, tokenizer=tokenizer)
        assert c.tokens and max(c.tokens) < tokenizer.vocab_size
