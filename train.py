"""Pretrain a GPT on a corpus prepared by prepare.py.

    python prepare.py --out data/corpus                  # the embedded default corpus (or your own)
    python train.py --data=data/corpus --out_dir=runs/mini --model=mini --max_steps=2000
    python train.py --out_dir=runs/mini --resume                             # continue it, same settings
    python train.py --model=small --n_layer=8 --dropout=0.1 ...              # any GPTConfig field
    torchrun --standalone --nproc_per_node=2 train.py --data=data/corpus ... # data parallel (gloo/nccl)
    python train.py --help                                                   # every option

Prints the resolved config, one line per step (step/total | loss | lr | ms | tok/s | MFU | ETA), an
evaluation line every --eval_every steps, and at the end the val perplexity, a few samples and where
the checkpoint, metrics.jsonl and loss.svg are. Ctrl-C stops after the current step and saves.
"""

from __future__ import annotations

import sys

from minillm import cli
from minillm.config import GPTConfig
from minillm.pretrain import PretrainConfig, pretrain, run_configs
from minillm.trainer import TrainConfig, TrainingDiverged


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    defaults = (PretrainConfig(), TrainConfig(out_dir="runs/default"), GPTConfig.from_preset(PretrainConfig().model))
    if "-h" in argv or "--help" in argv:
        cli.parse_args(argv, *defaults, prog="train.py", description=__doc__.split("\n\n")[0])  # prints, exits
    try:
        pre, train_config, model_overrides = run_configs(argv, *defaults)
    except (ValueError, TypeError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        pretrain(pre, train_config, model_overrides)
    except (FileNotFoundError, ValueError, TrainingDiverged) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
