"""Prepare a corpus: read documents, clean and redact them, drop duplicates and junk, split them,
train a tokenizer on the train split and write one token file per split, with a report that
accounts for every document read.

    python prepare.py                                    # the embedded default corpus -> data/corpus
    python prepare.py --input train=../shared/data/imdb_train.csv --input test=../shared/data/imdb_test.csv \\
        --text_field review --label_field sentiment --out data/imdb
    python prepare.py --input ../shared/data/SMSSpamCollection --format tsv --columns label,text \\
        --label_field label --min_chars 1 --out data/sms
    python prepare.py --input ../shared/data/tinyshakespeare.txt --doc_sep blank --out data/shakespeare
    python prepare.py --input https://example.org/corpus.jsonl.gz --on_bad skip   # cached after the first run
    python prepare.py --input notes/ --glob '**/*.md' --tokenizer data/corpus/tokenizer.bpe
    python prepare.py --stats data/imdb                  # print a finished folder's report again
    python prepare.py --help                             # every option, with its default

Writes into --out: train.bin, val.bin, test.bin (token files, read them with minillm.data.TokenFile),
tokenizer.bpe, documents.jsonl (kept documents: id, split, label, token offset and length, source),
dropped.jsonl (dropped documents with their reason), report.json. Exit status 1 with one line on
stderr for bad input (naming file, line and field), 2 for a bad option.
"""

from __future__ import annotations

import sys

from minillm import cli
from minillm.cleaning import CleanConfig
from minillm.data import DataError, PrepareConfig, format_report, load_report, prepare
from minillm.dedup import DedupConfig
from minillm.sources import SourceConfig
from minillm.tokenfile import TokenFileError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    configs = cli.parse_args(argv, PrepareConfig(), SourceConfig(), CleanConfig(), DedupConfig(),
                             prog="prepare.py", description=__doc__.split("\n\n")[0])
    config = configs[0]
    try:
        if config.stats is not None:
            print(format_report(load_report(config.stats)))
            return 0
        print(cli.format_config(*configs), flush=True)
        report = prepare(*configs)
    except (DataError, TokenFileError, OSError) as err:
        print(f"prepare.py: error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    print(f"wrote {config.out}/: train.bin val.bin test.bin tokenizer.bpe documents.jsonl dropped.jsonl report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
