"""Generation metrics: a model rigged to answer "aaaa" gets the ROUGE-L and BLEU derived by hand;
instruction rows are rendered with the prompt template; sampled answers do not depend on the batch
size; bad rows are named."""

import json

import pytest
from eval_fixtures import bpe_tokenizer, byte_tokenizer, tiny_gpt, unigram_model

from minillm.generation_eval import GenerationDataError, GenerationEvalConfig, evaluate_generation, read_examples
from minillm.metrics import corpus_bleu
from minillm.prompts import PromptTemplate


def test_rigged_answers_get_the_scores_derived_by_hand(tmp_path):
    tok = byte_tokenizer()
    model, _ = unigram_model(tok, {"a": 8.0})  # greedy: "a" after "a", whatever the prompt
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Say a:", "reference": "aaaa"}) + "\n\n"
                    + json.dumps({"prompt": "Say b:", "reference": ["b b", "aaaa x"]}) + "\n")
    result = evaluate_generation(model, tok, path, GenerationEvalConfig(max_new_tokens=4), progress=False)
    assert [o["prediction"] for o in result.outputs] == ["aaaa", "aaaa"]
    # ROUGE-L F: 1 for the first; the second's best reference "aaaa x" has LCS 1 of (1, 2) words: 2/3
    assert result.rouge_l.fmeasure == pytest.approx((1 + 2 / 3) / 2)
    assert result.rouge_l.recall == pytest.approx((1 + 1 / 2) / 2)
    assert result.bleu == pytest.approx(corpus_bleu(["aaaa", "aaaa"], [["aaaa"], ["b b", "aaaa x"]]).score)
    assert result.generated_tokens == 8 and result.examples == 2
    assert result.outputs[1]["id"] == f"{path}:3" and "BLEU" in result.line()


def test_instruction_rows_use_the_template_and_sampling_ignores_the_batch_size(tmp_path):
    tok = bpe_tokenizer(300)
    model = tiny_gpt(tok.vocab_size, block_size=64)
    rows = [{"instruction": f"Name a number above {i}.", "input": "" if i % 2 else "digits", "output": f"{i + 1}"}
            for i in range(5)]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(rows))
    template = PromptTemplate()
    examples = read_examples(path, template)
    assert [e.prompt for e in examples] == [template.render(r["instruction"], r["input"]) for r in rows]
    assert examples[2].references == ["3"] and examples[2].id == f"{path}[2]"
    config = dict(max_new_tokens=6, temperature=1.0, top_k=None, seed=3)
    one = evaluate_generation(model, tok, path, GenerationEvalConfig(batch_size=1, **config), progress=False)
    three = evaluate_generation(model, tok, path, GenerationEvalConfig(batch_size=3, **config), progress=False)
    assert [o["prediction"] for o in one.outputs] == [o["prediction"] for o in three.outputs]
    sample = evaluate_generation(model, tok, path, GenerationEvalConfig(max_docs=2, **config), progress=False)
    assert sample.examples == 2 and "2 of 5 examples" in sample.source


def test_bad_example_files_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n{"question": "a"}\n')
    with pytest.raises(GenerationDataError, match=r"bad\.jsonl:2: needs prompt and reference"):
        read_examples(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('[{"prompt": "a", "reference": 3}]')
    with pytest.raises(GenerationDataError, match=r"wrong\.json\[0\]: the prompt must be a string"):
        read_examples(wrong)
    with pytest.raises(GenerationDataError, match="no examples"):
        (tmp_path / "empty.jsonl").write_text("\n")
        read_examples(tmp_path / "empty.jsonl")
