"""The shared progress reporter: what it prints, how often, and silence when disabled."""

import io

from minillm.progress import Progress, format_duration, format_rate


def test_formatting():
    assert format_duration(4.24) == "4.2s"
    assert format_duration(65) == "1m05s"
    assert format_duration(3725) == "1h02m05s"
    assert format_rate(2_500_000, "bytes") == "2.5 MB/s"
    assert format_rate(1500, "docs") == "1.5k docs/s"
    assert format_rate(3, "docs") == "3.0 docs/s"


def test_reports_count_rate_eta_and_final_line():
    out = io.StringIO()
    with Progress(total=10, desc="tokenize", unit="docs", stream=out, min_interval=0.0) as progress:
        for _ in range(4):
            progress.update(1, bytes=1000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # four updates (interval 0) and the final line
    assert lines[0].startswith("tokenize | 1/10 docs (10%) | ") and "ETA" in lines[0]
    assert "4/10 docs (40%)" in lines[-1] and "/s" in lines[-1] and "elapsed" in lines[-1]


def test_rate_limited_and_silent_when_disabled():
    out = io.StringIO()
    progress = Progress(total=None, stream=out, min_interval=3600)
    for _ in range(100):
        progress.update()
    progress.close()
    assert out.getvalue().count("\n") == 1 and "100 it" in out.getvalue()
    quiet = io.StringIO()
    with Progress(total=5, stream=quiet, enabled=False) as progress:
        progress.update(5)
    assert quiet.getvalue() == ""
