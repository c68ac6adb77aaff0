"""Finetune a pretrained GPT, through the same training loop train.py runs: classification (spam,
sentiment), instruction following, either with LoRA adapters; and label texts with a classifier.

    python finetune.py classify --init_from runs/sms-pre --data data/sms --out_dir runs/sms-clf
    python finetune.py classify --init_from runs/pre --input ../shared/data/SMSSpamCollection --format tsv \\
        --columns label,text --label_field label --balance train --out_dir runs/sms-clf
    python finetune.py classify --init_from runs/imdb-pre --input train=../shared/data/imdb_train.csv \\
        --input test=../shared/data/imdb_test.csv --text_field review --label_field sentiment --out_dir runs/imdb
    python finetune.py classify --ckpt runs/sms-clf --predict "WINNER! Claim your free prize now"
    python finetune.py classify --ckpt runs/sms-clf --predict_file messages.txt   # one text per line
    python finetune.py instruct --init_from runs/pre --data ../shared/data/instruction-data.json \\
        --out_dir runs/instruct --score_base
    python finetune.py instruct --init_from runs/pre --trainable lora --lora_rank 8 --out_dir runs/instruct-lora
    python finetune.py merge --ckpt runs/instruct-lora --out runs/instruct-merged     # LoRA folded in, for export
    python finetune.py classify --help                                               # every option

--init_from takes a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder. `classify`
prints the config, the examples per split and class, what trains, one line per step, and at the end
accuracy, per-class and macro precision/recall/F1 and the confusion matrix of val and test (saved in
OUT_DIR/scores.json). `instruct` prints the same training lines and the ROUGE-L of the model's
answers to the test records (OUT_DIR/responses.json beside the references, OUT_DIR/scores.json).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from minillm import cli
from minillm.trainer import TrainConfig

COMMANDS = ("classify", "instruct", "merge")


@dataclass
class MergeConfig:
    """Fold a LoRA checkpoint's adapters into its weights and save a plain checkpoint."""

    ckpt: str = ""  # the LoRA run or checkpoint folder
    out: Path = Path("runs/merged")  # where the merged checkpoint goes: a new run folder
    overwrite: bool = False  # replace the checkpoints already in --out


def classify(argv: list[str]) -> None:
    from minillm.classify import ClassifyConfig, finetune_classifier, predict_main
    from minillm.finetuning import FinetuneConfig
    from minillm.lora import LoRAConfig
    from minillm.sources import SourceConfig

    # a lower learning rate than pretraining's, and a short schedule: the features exist already
    train_defaults = TrainConfig(out_dir=Path("runs/classify"), max_steps=300, batch_size=16, learning_rate=1e-4,
                                 warmup_steps=20, eval_every=50, checkpoint_every=300, log_every=10)
    ft, cc, source, lora, train_config = cli.parse_args(
        argv, FinetuneConfig(), ClassifyConfig(), SourceConfig(), LoRAConfig(), train_defaults,
        prog="finetune.py classify", description="Finetune a pretrained GPT to classify texts.")
    if cc.predict or cc.predict_file is not None:
        predict_main(cc, train_config.out_dir, train_config.device)
    else:
        finetune_classifier(ft, cc, source, lora, train_config)


def instruct(argv: list[str]) -> None:
    from minillm.finetuning import FinetuneConfig
    from minillm.instruct import InstructConfig, finetune_instruct
    from minillm.lora import LoRAConfig
    from minillm.prompts import PromptTemplate

    train_defaults = TrainConfig(out_dir=Path("runs/instruct"), max_steps=240, batch_size=8, learning_rate=1e-4,
                                 warmup_steps=20, eval_every=40, checkpoint_every=240, log_every=10)
    ft, ic, template, lora, train_config = cli.parse_args(
        argv, FinetuneConfig(trainable="all"), InstructConfig(), PromptTemplate(), LoRAConfig(), train_defaults,
        prog="finetune.py instruct", description="Finetune a pretrained GPT to follow instructions.")
    finetune_instruct(ft, ic, template, lora, train_config)


def merge(argv: list[str]) -> None:
    from minillm.checkpoint import CLASSIFIER_KEY, LORA_KEY, list_checkpoints, load_checkpoint, save_checkpoint
    from minillm.classify import load_classifier
    from minillm.tokenizer import TOKENIZER_FILE

    config = cli.parse_args(argv, MergeConfig(), prog="finetune.py merge", description=MergeConfig.__doc__)
    if not config.ckpt:
        raise ValueError("finetune.py merge needs --ckpt (a LoRA run or checkpoint folder)")
    ckpt = load_checkpoint(config.ckpt)
    if ckpt.lora_config() is None:
        raise ValueError(f"{ckpt.path} has no LoRA adapters to merge")
    out = Path(config.out)
    if out.resolve() in (ckpt.path.resolve(), ckpt.path.parent.resolve()):
        raise ValueError(f"--out {out} is the LoRA run itself: merging into it would replace its adapters and "
                         f"training state; name another folder")
    earlier = list_checkpoints(out)
    if earlier and not config.overwrite:
        raise ValueError(f"{out} already holds checkpoints ({', '.join(p.name for p in earlier[:3])}): "
                         f"pass --overwrite to replace them, or another --out")
    for old in earlier:
        shutil.rmtree(old)
    model = load_classifier(ckpt.path)[0] if CLASSIFIER_KEY in ckpt.meta else ckpt.model()  # merged on loading
    keep = {k: v for k, v in ckpt.meta.items() if k not in ("format", "version", "step", "model", LORA_KEY)}
    tokenizer = ckpt.tokenizer()
    out = save_checkpoint(out, ckpt.step, model, configs=keep,
                          writers={TOKENIZER_FILE: tokenizer.save} if tokenizer else None)
    print(f"merged {ckpt.path} -> {out} ({model.num_params():,} parameters, no adapters)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        print(f"finetune.py: error: the first argument must be one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = {"classify": classify, "instruct": instruct, "merge": merge}[argv[0]]
    from minillm.trainer import TrainingDiverged

    try:
        command(argv[1:])
    except (FileNotFoundError, ValueError, TrainingDiverged) as err:  # DataError is a ValueError
        print(f"finetune.py {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
