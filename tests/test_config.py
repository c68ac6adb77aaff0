"""GPTConfig validation and presets, and the shared --key=value command-line layer."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from minillm import cli
from minillm.config import PRESETS, GPTConfig


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size must be a positive integer"),
        (dict(n_head=5), r"n_embd \(768\) must be divisible by n_head \(5\)"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps must be positive"),
        (dict(impl="cuda"), "impl must be one of auto, torch, triton"),
        (dict(block_size=2.5), "block_size must be a positive integer"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**overrides)


def test_presets():
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "mini"}
    xl = GPTConfig.from_preset("gpt2-xl")
    assert (xl.n_layer, xl.n_head, xl.n_embd, xl.head_size) == (48, 25, 1600, 64)
    assert GPTConfig.from_preset("tiny", vocab_size=300).vocab_size == 300
    assert PRESETS["tiny"].vocab_size == 4096  # from_preset must not mutate the preset itself
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")


@dataclass
class DemoConfig:
    steps: int = 10  # how many steps
    lr: float = 1e-3  # learning rate
    compile: bool = False  # compile the model
    out_dir: Path = Path("runs")  # where to write
    max_tokens: int | None = None  # optional cap
    betas: tuple[float, ...] = (0.9, 0.95)  # Adam betas
    name: str = "x"  # run name
    dropout: float = 0.0  # shared with GPTConfig on purpose

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"DemoConfig.steps must be >= 1, got {self.steps}")


def test_parse_all_types():
    demo, gpt = cli.parse_args(
        ["--steps=5", "--lr", "3e-4", "--compile", "--out-dir=/tmp/x", "--max_tokens=1e6",
         "--betas=0.8,0.99", "--name", "hello world", "--n_layer=3"],
        DemoConfig(), GPTConfig(),
    )
    assert demo == DemoConfig(5, 3e-4, True, Path("/tmp/x"), 1_000_000, (0.8, 0.99), "hello world")
    assert gpt.n_layer == 3 and gpt.n_head == 12


def test_bool_negation_optional_none_and_sections():
    demo, gpt = cli.parse_args(["--no-compile", "--max_tokens=none", "--gpt.dropout=0.1"],
                               DemoConfig(compile=True, max_tokens=5), GPTConfig())
    assert demo.compile is False and demo.max_tokens is None
    assert gpt.dropout == 0.1 and demo.dropout == 0.0  # the section prefix set only one
    demo, gpt = cli.parse_args(["--dropout=0.2"], DemoConfig(), GPTConfig())
    assert demo.dropout == gpt.dropout == 0.2  # unprefixed, a shared key sets both


def test_defaults_come_from_the_given_instances():
    gpt = cli.parse_args(["--n_layer=1"], GPTConfig.from_preset("mini"))
    assert (gpt.n_layer, gpt.n_embd) == (1, 128)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stesp=3"], "unknown option --stesp; did you mean --steps?"),
        (["--steps=three"], "--steps: expected an integer, got 'three'"),
        (["--compile=maybe"], "--compile: expected true or false"),
        (["--steps=0"], "DemoConfig.steps must be >= 1, got 0"),
        (["--n_head=7"], "must be divisible by n_head"),
        (["steps=3"], "unexpected argument 'steps=3'"),
        (["--lr"], "--lr needs a value"),
        (["--no-lr"], "--no-lr is only for true/false options"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv, DemoConfig(), GPTConfig(), prog="demo.py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("demo.py: error: ") and message in err


def test_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"], DemoConfig(), GPTConfig(), prog="demo.py", description="Does a demo.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Does a demo." in out
    assert "--lr=0.001" in out and "learning rate" in out
    assert "--n_embd=768" in out and "width of the residual stream" in out


def test_dict_round_trip_and_errors():
    demo = DemoConfig(steps=3, out_dir=Path("a/b"), betas=(0.1, 0.2))
    data = cli.to_dict(demo)
    assert data["out_dir"] == "a/b" and data["betas"] == [0.1, 0.2]
    assert cli.from_dict(DemoConfig, data) == demo
    with pytest.raises(ValueError, match="run.json: unknown DemoConfig field"):
        cli.from_dict(DemoConfig, {"steps": 1, "stepz": 2}, source="run.json")
    with pytest.raises(ValueError, match="run.json: DemoConfig.steps must be >= 1"):
        cli.from_dict(DemoConfig, {"steps": 0}, source="run.json")
    assert '"gpt": {' in cli.format_config(GPTConfig())


def test_repeated_list_option_accumulates():
    @dataclass
    class InputsConfig:
        input: list[str] = field(default_factory=list)  # input files, repeatable
        tags: tuple[str, ...] = ()  # a tuple is set whole: the last one given wins

    config = cli.parse_args(["--input", "train=a.csv", "--input=test=b.csv,c.csv", "--tags=x", "--tags=y"],
                            InputsConfig())
    assert config.input == ["train=a.csv", "test=b.csv", "c.csv"] and config.tags == ("y",)
    assert cli.parse_args([], InputsConfig()).input == []


def test_an_option_missing_its_value_does_not_swallow_the_next_option():
    from minillm.trainer import TrainConfig

    with pytest.raises(ValueError, match="--out_dir needs a value"):
        cli.parse_overrides(["--out_dir", "--resume"], TrainConfig())
    assert cli.parse_overrides(["--learning_rate", "-1e-3"], TrainConfig())[0]["learning_rate"] == -1e-3  # not an option
