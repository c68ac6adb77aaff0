"""Classification finetuning: a pretrained GPT whose output head is replaced by a classifier over
the labels of the data (spam/ham, positive/negative), trained through the shared training loop.

    text -> token ids (cut to max_length) -> GPT blocks -> ln_f -> hidden state of the LAST REAL token
         -> classifier: Linear(n_embd, num_classes) -> logits (B, num_classes) -> cross-entropy

Why the last token: attention is causal, so only the last position has seen the whole text. Batches
are right-padded to their longest text, and each row is read at its own last real token (its
length - 1); causal attention keeps every real token from seeing the padding after it, so a text
gets the same logits alone or in any batch.

`finetune.py classify` runs `finetune_classifier`: load the labelled data (`minillm.labelled`) and
the pretrained model (`--init_from`), pick what trains (`minillm.finetuning`: head, last blocks,
all, LoRA, gradual unfreezing), train with `trainer.train` (evaluating val loss and accuracy), then
score val and test with `minillm.metrics` (accuracy, per-class and macro precision/recall/F1,
confusion matrix), print the tables and save them as JSON (`scores.json` in the run folder).

A saved classifier is a checkpoint whose minillm.json has a "classifier" section (the classes, the
length and the side texts are cut from) beside the GPT's config; its weights are the GPT's, minus
lm_head, plus `classifier.weight` and `classifier.bias` (and LoRA adapters, merged when loaded).
`load_classifier` opens one; `predict_texts` labels new texts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import cli
from minillm.checkpoint import CLASSIFIER_KEY, LORA_KEY, load_checkpoint, restore_weights
from minillm.config import GPTConfig
from minillm.finetuning import ExampleBatches, FinetuneConfig, TrainableSchedule, finetune_start
from minillm.labelled import BALANCE, LabelledText, load_labelled
from minillm.lora import ADAPTERS_FILE, LoRAConfig, add_lora, merge_lora, save_adapters
from minillm.metrics import classification_report
from minillm.model import GPT
from minillm.sources import SourceConfig

KEEP = ("start", "end")
SCORES_FILE = "scores.json"


@dataclass
class ClassifyConfig:
    """What to classify and how texts are read; predictions with a saved classifier."""

    data: Path | None = None  # a prepare.py output folder with labelled documents (else --input files)
    max_length: int = 0  # tokens read per text, longer texts are cut; 0: the longest train text, up to the block size
    keep: str = "start"  # which part of a longer text is kept: start or end
    val_fraction: float = 0.1  # an empty val split is carved out of train: this share of every class
    test_fraction: float = 0.2  # an empty test split is carved out of train: this share of every class
    balance: str = "none"  # downsample every class to the rarest one's count: none, train or all (every split)
    dedup: bool = True  # --input files: drop exact duplicate texts (the test copy is the one kept)
    eval_examples: int = 0  # val examples scored at each evaluation during training (0: all)
    predict: str = ""  # label this text with a saved classifier (--ckpt) and exit
    predict_file: Path | None = None  # label every line of this file with --ckpt, printing label, probability, text
    ckpt: str = ""  # the classifier --predict uses (a run or checkpoint folder; default: --out_dir)
    progress: bool = True  # progress bars on stderr while reading and scoring

    def __post_init__(self) -> None:
        if self.data is not None:
            self.data = Path(self.data)
        if self.max_length < 0 or self.eval_examples < 0:
            raise ValueError("ClassifyConfig.max_length and eval_examples must not be negative")
        if self.keep not in KEEP:
            raise ValueError(f"ClassifyConfig.keep must be start or end, got {self.keep!r}")
        if self.balance not in BALANCE:
            raise ValueError(f"ClassifyConfig.balance must be one of {', '.join(BALANCE)}; got {self.balance!r}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ClassifyConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("ClassifyConfig.val_fraction + test_fraction must leave documents for train")


class GPTClassifier(GPT):
    """A GPT with its output head replaced by `classifier`, read at each text's last real token:
    `forward(idx (B, T), lengths (B,)) -> logits (B, num_classes)`."""

    def __init__(self, config: GPTConfig, num_classes: int):
        super().__init__(config)
        del self.lm_head  # the vocabulary head is gone (tied, it was the embedding, which stays)
        self.classifier = nn.Linear(config.n_embd, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.02)  # GPT-2's initialisation, as for every Linear
        nn.init.zeros_(self.classifier.bias)

    @classmethod
    def from_gpt(cls, gpt: GPT, num_classes: int) -> "GPTClassifier":
        """A classifier on `gpt`'s transformer (its modules, shared, not copied) with a new head."""
        with torch.device("meta"):  # the transformer is replaced at once: skip initialising one
            model = cls(gpt.config, num_classes)
        model.transformer = gpt.transformer
        weight = gpt.transformer.wte.weight
        model.classifier = nn.Linear(gpt.config.n_embd, num_classes, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(model.classifier.weight, std=0.02)
        nn.init.zeros_(model.classifier.bias)
        return model.train(gpt.training)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if lengths.shape != idx.shape[:1] or int(lengths.min()) < 1 or int(lengths.max()) > idx.shape[1]:
            raise ValueError(f"lengths must be (B,) = ({idx.shape[0]},) with values in [1, {idx.shape[1]}]")
        hidden = self.hidden_states(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.shape[0], device=idx.device), lengths - 1]  # (B, C)
        return self.classifier(last)  # (B, num_classes)


def cut(ids: np.ndarray, max_length: int, keep: str) -> np.ndarray:
    """At most `max_length` tokens of a text: its start or its end."""
    return ids[:max_length] if keep == "start" else ids[-max_length:]


def collate(examples: list[tuple[np.ndarray, int]], pad_id: int = 0) -> tuple[torch.Tensor, ...]:
    """(ids, class index) pairs -> idx (B, T) right-padded to the longest, lengths (B,), labels (B,)."""
    lengths = [max(len(ids), 1) for ids, _ in examples]
    idx = torch.full((len(examples), max(lengths)), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        idx[row, : len(ids)] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    labels = torch.tensor([label for _, label in examples], dtype=torch.long)
    return idx, torch.tensor(lengths, dtype=torch.long), labels


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The trainer's loss_fn: mean cross-entropy of the class logits (in fp32 under autocast)."""
    idx, lengths, labels = batch
    return F.cross_entropy(model(idx, lengths).float(), labels)


@torch.no_grad()
def class_probabilities(model: GPTClassifier, ids: list[np.ndarray], batch_size: int = 32, pad_id: int = 0,
                        progress: bool = False, desc: str = "classify") -> torch.Tensor:
    """Class probabilities (N, num_classes) for token id sequences, batched by length (less padding)."""
    from minillm.progress import Progress

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    probs = torch.empty(len(ids), model.classifier.out_features)
    with Progress(len(ids), desc=desc, unit="texts", enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            idx, lengths, _ = collate([(ids[i], 0) for i in rows], pad_id)
            logits = model(idx.to(device), lengths.to(device)).float()
            probs[rows] = torch.softmax(logits, dim=-1).cpu()
            bar.update(len(rows))
    model.train(was_training)
    return probs


def classifier_evaluator(examples: list[tuple[np.ndarray, int]], batch_size: int, pad_id: int):
    """An `evaluate(model)` for the trainer: val loss and accuracy over fixed examples."""
    def evaluate(model: nn.Module) -> dict[str, float]:
        probs = class_probabilities(model, [ids for ids, _ in examples], batch_size, pad_id)
        labels = torch.tensor([label for _, label in examples])
        picked = probs[torch.arange(len(labels)), labels].clamp_min(1e-12)
        return {"val_loss": float(-picked.log().mean()), "val_accuracy": float((probs.argmax(-1) == labels).float().mean())}

    return evaluate


def score(model: GPTClassifier, examples: list[tuple[np.ndarray, int]], classes: list[str], batch_size: int = 32,
          pad_id: int = 0, progress: bool = False, desc: str = "score"):
    """The classification report (`minillm.metrics`) of the model's predictions on (ids, class) examples."""
    probs = class_probabilities(model, [ids for ids, _ in examples], batch_size, pad_id, progress=progress, desc=desc)
    return classification_report([classes[y] for _, y in examples], [classes[int(i)] for i in probs.argmax(-1)],
                                 labels=classes)


def classifier_meta(classes: list[str], max_length: int, keep: str, pad_id: int) -> dict[str, Any]:
    """The "classifier" section of a classifier checkpoint's minillm.json."""
    return {"classes": list(classes), "max_length": max_length, "keep": keep, "pad_id": pad_id, "pooling": "last_token"}


def load_classifier(path: str | Path, device: str | torch.device = "cpu"):
    """(classifier in eval mode, tokenizer, its "classifier" metadata) from a checkpoint or run
    folder that classification finetuning wrote; LoRA adapters are merged into the weights."""
    ckpt = load_checkpoint(path)
    meta = ckpt.meta.get(CLASSIFIER_KEY)
    if meta is None:
        raise ValueError(f"{ckpt.path} holds a language model, not a classifier (its minillm.json has no "
                         f"{CLASSIFIER_KEY!r} section): finetune one with `finetune.py classify`")
    lora = ckpt.lora_config()
    with torch.device("meta"):
        model = GPTClassifier(ckpt.model_config(), len(meta["classes"]))
        if lora is not None:
            add_lora(model, lora)
    restore_weights(model, ckpt.tensors(device=device), source=ckpt.path, assign=True)
    if lora is not None:
        merge_lora(model)
    return model.to(device).eval(), ckpt.tokenizer(), meta


def predict_texts(model: GPTClassifier, tokenizer, meta: dict[str, Any], texts: list[str],
                  batch_size: int = 32) -> list[tuple[str, float, list[float]]]:
    """(label, its probability, every class's probability) for each text."""
    ids = [cut(np.asarray(tokenizer.encode_ordinary(t) or [meta["pad_id"]]), meta["max_length"], meta["keep"])
           for t in texts]
    probs = class_probabilities(model, ids, batch_size, meta["pad_id"])
    best = probs.argmax(-1)
    return [(meta["classes"][int(b)], float(p[b]), p.tolist()) for b, p in zip(best, probs)]


def finetune_classifier(ft: FinetuneConfig, cc: ClassifyConfig, source: SourceConfig, lora: LoRAConfig,
                        train_config, print_fn=print) -> dict[str, Any]:
    """The whole `finetune.py classify` job; returns the scores written to scores.json."""
    from minillm.tokenizer import TOKENIZER_FILE
    from minillm.trainer import train

    with finetune_start(ft, train_config, print_fn) as start:
        dist, base, say = start.dist, start.base, start.say
        tokenizer = base.tokenizer
        data = load_labelled(data=cc.data, source=source, tokenizer=tokenizer, seed=train_config.seed,
                             val_fraction=cc.val_fraction, test_fraction=cc.test_fraction, balance=cc.balance,
                             dedup=cc.dedup, progress=cc.progress and dist.is_main)
        block = base.model.config.block_size
        longest = max(len(t.ids) for t in data.splits["train"])
        max_length = min(cc.max_length or longest, block)
        pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        index = {c: i for i, c in enumerate(data.classes)}

        def examples(texts: list[LabelledText]) -> list[tuple[np.ndarray, int]]:
            return [(cut(t.ids, max_length, cc.keep) if len(t.ids) else np.array([pad_id]), index[t.label]) for t in texts]

        train_ex, val_ex, test_ex = (examples(data.splits[s]) for s in ("train", "val", "test"))
        model = GPTClassifier.from_gpt(base.model, len(data.classes))
        schedule = TrainableSchedule(model, ft, list(model.classifier.parameters()), lora if ft.trainable == "lora" else None)
        schedule.prepare()
        model.to(dist.device)
        say(cli.format_config(ft, cc, source, *([lora] if ft.trainable == "lora" else []), train_config))
        say("\n".join([f"base: {base.source}", *data.notes, data.table()]))
        cut_count = sum(len(t.ids) > max_length for t in data.splits["train"])
        say(f"classes: {', '.join(data.classes)} | texts read up to {max_length} tokens (keeping the {cc.keep}; "
            f"{cut_count:,} train texts cut, the longest has {longest:,})")
        say(schedule.describe())
        val_eval = val_ex[: cc.eval_examples] if cc.eval_examples else val_ex
        meta = classifier_meta(data.classes, max_length, cc.keep, pad_id)
        configs: dict[str, Any] = {"finetune": ft, "classify": cc, CLASSIFIER_KEY: meta}
        writers = {TOKENIZER_FILE: tokenizer.save}
        if ft.trainable == "lora":
            configs[LORA_KEY] = lora
            writers[ADAPTERS_FILE] = lambda path: save_adapters(model, lora, path, base=ft.init_from,
                                                                include=("classifier.",))
        result = train(
            model, train_config,
            ExampleBatches(train_ex, train_config.batch_size, lambda b: collate(b, pad_id), seed=train_config.seed, dist=dist),
            dist=dist, evaluate=classifier_evaluator(val_eval, train_config.batch_size, pad_id) if val_eval else None,
            loss_fn=classification_loss, tokens_in=lambda batch: int(batch[1].sum()),
            checkpoint_configs=configs, checkpoint_writers=writers, on_step=schedule if ft.unfreeze_every else None,
            print_fn=print_fn,
        )
        scores: dict[str, Any] = {"classes": data.classes, "checkpoint": str(result.checkpoint), "steps": result.steps}
        if dist.is_main:
            for split, ex in (("val", val_ex), ("test", test_ex)):
                if not ex:
                    continue
                report = score(model, ex, data.classes, train_config.batch_size, pad_id, progress=cc.progress,
                               desc=f"score {split}")
                scores[split] = report.to_dict()
                say(f"\n{split}: {len(ex):,} texts | accuracy {report.accuracy:.4f} | macro F1 {report.macro_f1:.4f}\n"
                    f"{report.table()}")
            path = train_config.out_dir / SCORES_FILE
            path.write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
            say(f"\nscores: {path}\ncheckpoint: {result.checkpoint}\n"
                f"predict: python finetune.py classify --ckpt {train_config.out_dir} --predict \"some text\"")
        return scores


def predict_main(cc: ClassifyConfig, out_dir: Path, device: str = "cpu", print_fn=print) -> list:
    """`finetune.py classify --predict TEXT` / `--predict_file FILE`: print label, probability, text."""
    from minillm.distributed import resolve_device

    path = cc.ckpt or out_dir
    model, tokenizer, meta = load_classifier(path, resolve_device(device))
    if tokenizer is None:
        raise ValueError(f"{path}: the checkpoint has no tokenizer")
    if cc.predict_file is not None:
        try:
            texts = [line.rstrip("\n") for line in open(cc.predict_file, encoding="utf-8") if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{cc.predict_file}: cannot read it ({err})") from None
    else:
        texts = [cc.predict]
    results = predict_texts(model, tokenizer, meta, texts)
    for text, (label, p, _) in zip(texts, results):
        print_fn(f"{label}\t{p:.4f}\t{text}")
    return results
