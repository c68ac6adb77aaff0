"""Multiple-choice scoring: a model rigged to prefer the planted answer picks it; acc and acc_norm
follow the harness's definitions on log-likelihoods derived by hand; batched scoring equals one
direct pass per choice; the public layouts read into the harness's prompts; bad files are named."""

import json
import math

import numpy as np
import pytest
import eval_fixtures
import torch
from eval_fixtures import unigram_model

from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.multiple_choice import (
    BenchmarkError,
    MultipleChoiceConfig,
    Question,
    continuation_logprobs,
    encode_request,
    evaluate_multiple_choice,
    read_questions,
    score_questions,
)



@pytest.fixture(scope="module")
def byte_tokenizer():
    return eval_fixtures.byte_tokenizer()


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return eval_fixtures.bpe_tokenizer(300)


def test_the_rigged_model_picks_the_planted_answer(byte_tokenizer):
    model, _ = unigram_model(byte_tokenizer, {"z": 6.0})
    questions = [
        Question("Which one?", ["zzz", "abc", "mat"], 0),
        Question("And now:", ["the cat", "zz top", "a dog"], 1),
        Question("", ["xyz", "sat", "zoo"], 0),  # "xyz" and "zoo" each have one z: a tie goes to the first
        Question("Last\n", ["ran", "pat", "zap"], 2),  # same lengths: only the z tells them apart
    ]
    result = score_questions(model, byte_tokenizer, questions, batch_size=3, progress=False)
    assert [q["pred"] for q in result.per_question] == [0, 1, 0, 2]
    assert result.acc == 1.0 and result.questions == 4


def test_acc_and_acc_norm_follow_the_harness_definitions(byte_tokenizer):
    """Unigram log-probabilities lp: a choice scores lp(" ") + sum of lp(c); acc takes the largest
    sum, acc_norm the largest sum / len(choice) (the delimiter not counted)."""
    model, lp = unigram_model(byte_tokenizer, {"a": 3.0, "b": 2.0, " ": 1.0})
    (ia,), (ib,), (isp,) = (byte_tokenizer.encode_ordinary(c) for c in "ab ")
    la, lb, lsp = lp[ia].item(), lp[ib].item(), lp[isp].item()
    choices = ["a", "bbbbbb"]
    expected = [lsp + la, lsp + 6 * lb]
    assert expected[0] > expected[1] and expected[0] / 1 < expected[1] / 6  # the two rules disagree here
    questions = [Question("Q:", choices, 0), Question("Q:", choices, 1)]
    result = score_questions(model, byte_tokenizer, questions, progress=False)
    assert result.per_question[0]["logprobs"] == pytest.approx(expected, rel=1e-6)
    assert [(q["pred"], q["pred_norm"]) for q in result.per_question] == [(0, 1), (0, 1)]
    assert (result.acc, result.acc_norm) == (0.5, 0.5)
    assert result.acc_stderr == pytest.approx(np.std([1, 0], ddof=1) / math.sqrt(2))
    alone = score_questions(model, byte_tokenizer, questions[:1], progress=False)  # no spread to estimate
    assert "acc 1.0000 ± n/a" in alone.line() and alone.to_dict()["acc_stderr"] is None


def test_batched_scores_equal_one_direct_pass_per_choice(bpe_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=bpe_tokenizer.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=32,
                          impl="torch")).eval()
    texts = [("The cat", " sat on the mat."), ("", " A dog"), ("Why? " * 12, " Because it could."),
             ("A dog ran in", " the park! Why?"), ("3", " times")]
    requests = [encode_request(bpe_tokenizer, c, t) for c, t in texts]
    assert len(requests[2][0]) + len(requests[2][1]) > 25  # this one is cut from the left
    batched = continuation_logprobs(model, requests, batch_size=2)
    for (context, continuation), got in zip(requests, batched):
        seq = torch.tensor((context + continuation)[-25:])
        logprobs = torch.log_softmax(model(seq[None, :-1])[0][0].double(), -1)  # (T, V)
        n = len(continuation)
        direct = logprobs[torch.arange(len(seq) - 1 - n, len(seq) - 1), seq[-n:]].sum().item()
        assert got == pytest.approx(direct, rel=1e-5, abs=1e-5)


def test_encode_request_splits_like_the_harness(bpe_tokenizer):
    tok = bpe_tokenizer
    context, continuation = encode_request(tok, "The cat sat ", "on the mat")
    assert tok.decode(context) == "The cat sat" and tok.decode(continuation) == " on the mat"
    assert context + continuation == tok.encode_ordinary("The cat sat on the mat")
    assert encode_request(tok, "", " A dog")[0] == [tok.eot_id]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_public_layouts_read_into_the_harness_prompts(tmp_path):
    hellaswag = write_jsonl(tmp_path / "hellaswag_val.jsonl", [
        {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof."], "label": 1},
        {"ind": 92, "activity_label": "Home and Garden",
         "ctx_a": "[header] How to grow peppers [title] Choose a spot. [step] Peppers like sun.", "ctx_b": "",
         "endings": ["[substeps] Water them.", "Ignore them."], "label": "0"},
    ])
    questions, fmt = read_questions(hellaswag)
    assert fmt == "hellaswag" and [q.label for q in questions] == [1, 0]
    assert questions[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert questions[0].choices[1] == "starts pulling up roofing on a roof." and questions[0].id == "24"
    assert questions[1].context == "Home and Garden: How to grow peppers. Choose a spot. Peppers like sun."
    # the harness strips before it drops the tags, so a leading tag leaves a space behind; kept, to score alike
    assert questions[1].choices == [" Water them.", "Ignore them."]

    arc_hf = write_jsonl(tmp_path / "arc.jsonl", [{"id": "q1", "question": "Which is a gas?", "answerKey": "C",
                                                  "choices": {"text": ["ice", "rock", "steam"], "label": ["A", "B", "C"]}}])
    arc_ai2 = write_jsonl(tmp_path / "ARC-Easy-Dev.jsonl", [{"id": "q2", "answerKey": "2", "question": {
        "stem": "Which is alive?", "choices": [{"text": "a tree", "label": "1"}, {"text": "a stone", "label": "2"}]}}])
    (q1,), _ = read_questions(arc_hf)
    (q2,), _ = read_questions(arc_ai2, "arc")
    assert (q1.context, q1.choices, q1.label) == ("Question: Which is a gas?\nAnswer:", ["ice", "rock", "steam"], 2)
    assert (q2.context, q2.label) == ("Question: Which is alive?\nAnswer:", 1)

    piqa_hf = write_jsonl(tmp_path / "piqa_hf.jsonl", [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}])
    piqa_orig = write_jsonl(tmp_path / "valid.jsonl", [{"goal": "Dry hair", "sol1": "use a towel", "sol2": "use soup"},
                                                       {"goal": "Cut paper", "sol1": "use a spoon", "sol2": "use scissors"}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    (p1,), _ = read_questions(piqa_hf)
    originals, fmt = read_questions(piqa_orig)
    assert (p1.context, p1.choices, p1.label) == ("Question: Open a jar\nAnswer:", ["twist the lid", "eat it"], 0)
    assert fmt == "piqa" and [q.label for q in originals] == [0, 1] and originals[1].id == "valid.jsonl:2"


def test_bad_benchmark_files_are_named(tmp_path):
    cases = {
        "generic.jsonl": ([{"context": "a", "choices": ["x", "y"], "label": 2}], r"generic\.jsonl:1: not a generic question: label 2"),
        "missing.jsonl": ([{"context": "a", "choices": ["x"], "label": 0}, {"context": "b", "label": 0}],
                          r"missing\.jsonl:2: not a generic question: missing field 'choices'"),
        "hs_test.jsonl": ([{"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c"], "label": ""}],
                          "HellaSwag's test split has no answers"),
        "arc.jsonl": ([{"question": "q", "answerKey": "E", "choices": {"text": ["a"], "label": ["A"]}}], "answerKey 'E'"),
        "odd.jsonl": ([{"prompt": "?"}], r"odd\.jsonl:1: cannot tell the format"),
        "piqa.jsonl": ([{"goal": "g", "sol1": "a", "sol2": "b"}], r"piqa-labels\.lst"),
    }
    for name, (rows, message) in cases.items():
        with pytest.raises(BenchmarkError, match=message):
            read_questions(write_jsonl(tmp_path / name, rows))
    (tmp_path / "broken.jsonl").write_text('{"context": "a", "choices": ["x"], "label": 0}\n{oops\n')
    with pytest.raises(BenchmarkError, match=r"broken\.jsonl:2: not valid JSON"):
        read_questions(tmp_path / "broken.jsonl")
    with pytest.raises(ValueError, match="MultipleChoiceConfig.format"):
        MultipleChoiceConfig(format="mmlu")


def test_a_file_is_scored_and_max_docs_samples_it(tmp_path, byte_tokenizer):
    model, _ = unigram_model(byte_tokenizer, {"z": 6.0})
    rows = [{"context": f"Question {i}?", "choices": ["zz", "ab", "cd"][i % 3:] + ["zz", "ab", "cd"][: i % 3],
             "label": (3 - i % 3) % 3} for i in range(9)]
    path = write_jsonl(tmp_path / "bench.jsonl", rows)
    full = evaluate_multiple_choice(model, byte_tokenizer, path, progress=False)
    assert full.acc == 1.0 and full.acc_norm == 1.0 and full.questions == 9 and full.format == "generic"
    sample = evaluate_multiple_choice(model, byte_tokenizer, path, MultipleChoiceConfig(max_docs=4, seed=1), progress=False)
    assert sample.questions == 4 and "4 of 9 questions" in sample.source
    ids = [q["id"] for q in sample.per_question]
    assert ids == sorted(ids, key=lambda s: int(s.split(":")[1]))
    assert "acc 1.0000" in full.line() and full.to_dict()["questions"] == 9
