"""Sources: every input format, folders, gzip, URLs against a local server, the embedded default
corpus, streaming in flat memory, and bad input named by file, line and field."""

import collections
import csv
import functools
import gzip
import http.server
import json
import re
import threading
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.default_corpus import default_corpus, module_docstrings
from minillm.sources import (BadRecord, DataError, Document, SourceConfig, detect_format, fetch, parse_input,
                             read_documents)


def read(tmp_path, name, content, **options):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return list(read_documents(SourceConfig(input=[str(path)], **options), progress=False))


def test_parse_input():
    assert parse_input("train=a.csv") == ("train", "a.csv")
    assert parse_input("validation=x=y.txt") == ("val", "x=y.txt")
    assert parse_input("notasplit=a.csv") == (None, "notasplit=a.csv")
    assert parse_input("https://h/x?a=b") == (None, "https://h/x?a=b")


def test_text_whole_file_and_separators(tmp_path):
    docs = read(tmp_path, "a.txt", "\ufeffone\ntwo\n\n\nthree\n  \nfour")
    assert [d.text for d in docs] == ["one\ntwo\n\n\nthree\n  \nfour"] and docs[0].source.endswith("a.txt")
    docs = read(tmp_path, "a.txt", "one\ntwo\n\n\nthree\n  \nfour", doc_sep="blank")
    assert [(d.text, d.source.rsplit(":", 1)[1]) for d in docs] == [("one\ntwo\n", "1"), ("three\n", "5"),
                                                                    ("four", "7")]
    docs = read(tmp_path, "a.txt", "x\n\ny\nz\n", doc_sep="line")
    assert [(d.text, d.source.rsplit(":", 1)[1]) for d in docs] == [("x", "1"), ("y", "3"), ("z", "4")]
    docs = read(tmp_path, "a.txt", "a\nb<|endoftext|>c\n<|endoftext|>\nd", doc_sep="<|endoftext|>")
    assert [(d.text, d.source.rsplit(":", 1)[1]) for d in docs] == [("a\nb", "1"), ("c\n", "2"), ("\nd", "3")]
    docs = read(tmp_path, "a.txt", "p1\n---\np2 --- same line\n---\n", doc_sep="\\n---\\n")
    assert [d.text for d in docs] == ["p1", "p2 --- same line"]


def test_jsonl_fields_labels_and_splits(tmp_path):
    rows = [{"body": "first", "y": 1, "part": "train"}, {"body": "second", "y": "neg", "part": "validation"},
            {"body": None, "y": None, "part": ""}]
    content = "\n".join(json.dumps(r) for r in rows) + "\n\n"
    docs = read(tmp_path, "a.jsonl", content, text_field="body", label_field="y", split_field="part")
    assert [(d.text, d.label, d.split) for d in docs] == [("first", "1", "train"), ("second", "neg", "val"),
                                                          ("", None, None)]
    assert [d.source.rsplit(":", 1)[1] for d in docs] == ["1", "2", "3"]
    docs = read(tmp_path, "b.jsonl", content, text_field="body", split_field="part")
    assert docs[0].split == "train"
    # the input's own split applies when the record has none
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "x"}\n')
    assert list(read_documents(SourceConfig(input=[f"test={path}"]), progress=False))[0].split == "test"


def test_json_array_streams_across_chunks(tmp_path):
    records = [{"text": f"record {i} " + "x" * 3000, "label": i % 2} for i in range(600)]  # ~1.9 MB > one chunk
    docs = read(tmp_path, "a.json", json.dumps(records, indent=2), label_field="label")
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert [d.label for d in docs[:3]] == ["0", "1", "0"]
    assert [int(d.source.rsplit(":", 1)[1]) for d in docs[:3]] == [2, 6, 10]  # each record starts 4 lines on
    assert read(tmp_path, "e.json", " [ ] ") == []
    # a .json file that is not an array is read as JSON Lines
    assert [d.text for d in read(tmp_path, "l.json", '{"text": "a"}\n{"text": "b"}\n')] == ["a", "b"]


@pytest.mark.parametrize("content,message", [
    ('[{"text": "a"},\n {"text": "b" oops}]', "a.json:2: malformed JSON"),
    ('[{"text": "a"} {"text": "b"}]', "a.json:1: malformed JSON array: expected ',' or ']'"),
    ('[{"text": "a"},\n{"text": "b"', "a.json:2: malformed JSON"),
    ('[{"text": "a"}, 3]', "a.json:1: expected a JSON object, got int"),
])
def test_json_array_errors(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read(tmp_path, "a.json", content)


def test_csv_quoting_multiline_header_and_columns(tmp_path):
    content = '\ufeffreview,sentiment\n"Good, ""really""\nwith a newline",positive\nplain,negative\n\n'
    docs = read(tmp_path, "a.csv", content, text_field="review", label_field="sentiment")
    assert [(d.text, d.label) for d in docs] == [('Good, "really"\nwith a newline', "positive"), ("plain", "negative")]
    assert [d.source.rsplit(":", 1)[1] for d in docs] == ["2", "4"]  # the line where each record starts
    docs = read(tmp_path, "b.csv", "pos,fine\nneg,bad\n", columns=("label", "text"), label_field="label")
    assert [(d.text, d.label) for d in docs] == [("fine", "pos"), ("bad", "neg")]


def test_tsv_reads_quotes_as_text(tmp_path):
    docs = read(tmp_path, "a.tsv", 'text\tlabel\n"quoted start\tham\nsecond "line\tspam\n', label_field="label")
    assert [(d.text, d.label) for d in docs] == [('"quoted start', "ham"), ('second "line', "spam")]


def test_sms_spam_collection_reads_as_5574_rows(shared_data):
    config = SourceConfig(input=[str(shared_data / "SMSSpamCollection")], format="tsv", columns=("label", "text"),
                          label_field="label")
    docs = list(read_documents(config, progress=False))
    assert len(docs) == 5574
    assert collections.Counter(d.label for d in docs) == {"ham": 4827, "spam": 747}
    assert docs[0].text.startswith("Go until jurong point") and docs[-1].source.endswith(":5574")


def test_imdb_slice(shared_data, tmp_path):
    lines = (shared_data / "imdb_test.csv").read_bytes().split(b"\n")[:201]  # not splitlines: reviews hold \x85
    docs = read(tmp_path, "imdb.csv", b"\n".join(lines), text_field="review", label_field="sentiment")
    assert len(docs) == 200 and {d.label for d in docs} == {"positive", "negative"}
    assert sum("<br />" in d.text for d in docs) > 50  # the raw text, before cleaning


def test_folders_globs_and_gzip(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("bee")
    (root / "sub" / "a.txt").write_text("ay")
    (root / "sub" / "deeper" / "c.md").write_text("sea")
    (root / ".hidden.txt").write_text("never")
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt") as f:
        f.write('{"text": "gzipped"}\n')
    docs = list(read_documents(SourceConfig(input=[f"val={root}"]), progress=False))
    assert [d.text for d in docs] == ["bee", "ay", "gzipped", "sea"] and {d.split for d in docs} == {"val"}
    docs = list(read_documents(SourceConfig(input=[str(root)], glob="**/*.txt"), progress=False))
    assert [d.text for d in docs] == ["bee", "ay"]
    with pytest.raises(DataError, match="no files match"):
        list(read_documents(SourceConfig(input=[str(root)], glob="*.csv"), progress=False))
    with pytest.raises(DataError, match="no such file or folder"):
        list(read_documents(SourceConfig(input=[str(tmp_path / "nope")]), progress=False))
    (tmp_path / "bad.txt.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(DataError, match="bad.txt.gz: cannot read"):
        list(read_documents(SourceConfig(input=[str(tmp_path / "bad.txt.gz")], doc_sep="line"), progress=False))


def test_limit(tmp_path):
    docs = read(tmp_path, "a.txt", "\n".join(map(str, range(100))), doc_sep="line", limit=7)
    assert [d.text for d in docs] == list(map(str, range(7)))


@pytest.fixture
def http_folder(tmp_path):
    """A local HTTP server over tmp_path/site: (base URL, a function that stops it)."""
    site = tmp_path / "site"
    site.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)

    yield site, f"http://127.0.0.1:{server.server_address[1]}", stop
    stop()


def test_url_downloaded_once_into_the_cache(tmp_path, http_folder):
    site, base, stop = http_folder
    with gzip.open(site / "data.jsonl.gz", "wt") as f:
        f.write('{"text": "from the web", "y": "a"}\n{"text": "second", "y": "b"}\n')
    config = SourceConfig(input=[f"train={base}/data.jsonl.gz"], label_field="y", cache_dir=tmp_path / "cache")
    docs = list(read_documents(config, progress=False))
    assert [(d.text, d.label, d.split) for d in docs] == [("from the web", "a", "train"), ("second", "b", "train")]
    assert docs[0].source == f"{base}/data.jsonl.gz:1"  # messages name the URL, not the cache file
    cached = list((tmp_path / "cache" / "downloads").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-data.jsonl.gz")
    stop()  # the server is gone: the second read must come from the cache
    assert [d.text for d in read_documents(config, progress=False)] == ["from the web", "second"]
    with pytest.raises(DataError, match="download failed"):
        fetch(f"{base}/other.txt", tmp_path / "cache", progress=False)


def test_url_errors(tmp_path, http_folder):
    site, base, stop = http_folder
    with pytest.raises(DataError, match=r"missing.csv: download failed: HTTP 404"):
        fetch(f"{base}/missing.csv", tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / "downloads").iterdir())  # no partial file left behind


@pytest.mark.parametrize("name,content,options,message", [
    ("a.jsonl", '{"text": "ok"}\n{"text": "broken\n', {}, r"a.jsonl:2: malformed JSON \(Unterminated string"),
    ("a.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n', {},
     "a.jsonl:2: field 'text' is missing; the record has fields: body, id"),
    ("a.jsonl", '{"text": 5}\n', {}, "a.jsonl:1: field 'text' holds a int, expected a string"),
    ("a.jsonl", '["text"]\n', {}, "a.jsonl:1: expected a JSON object, got list"),
    ("a.jsonl", '{"text": "x", "split": "dev2"}\n', {"split_field": "split"},
     "a.jsonl:1: field 'split': split 'dev2' is not one of train, val, test"),
    ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', {}, r"a.jsonl:2: bytes are not UTF-8 \(byte 0xe9"),
    ("a.csv", "text,label\nfine,a\ntoo,many,fields\n", {}, r"a.csv:3: expected 2 fields \(text, label\), got 3"),
    ("a.csv", "review,sentiment\nx,y\n", {}, r"a.csv:1: the header has no column 'text' \(--text_field\); "
                                            "the columns are: review, sentiment"),
    ("a.csv", b"text\nok\n\xff\xfe\n", {}, "a.csv:3: bytes are not UTF-8"),
    ("a.txt", b"fine\nfine\nbad \xc3\x28 here", {}, r"a.txt:3: bytes are not UTF-8 \(byte 0xc3\)"),
])
def test_bad_input_is_named_and_skippable(tmp_path, name, content, options, message):
    with pytest.raises(DataError, match=message):
        read(tmp_path, name, content, **options)
    if "header" in message:
        return  # a missing column is wrong for every row: an error even with on_bad=skip
    items = read(tmp_path, name, content, on_bad="skip", **options)
    bad = [item for item in items if isinstance(item, BadRecord)]
    location = re.match(r"[\w.]+:\d+", message).group(0)
    assert len(bad) == 1 and bad[0].source.endswith(location) and re.search(message, bad[0].message)
    assert all(isinstance(item, Document) for item in items if item not in bad)


def test_reading_streams_in_flat_memory(tmp_path):
    path = tmp_path / "big.csv"
    row = "text,label\n" + "".join(f'"{"word " * 200}{i}",x\n' for i in range(6000))  # ~6 MB
    path.write_text(row)
    tracemalloc.start()
    count = sum(1 for _ in read_documents(SourceConfig(input=[str(path)]), progress=False))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 6000 and peak < 1_000_000  # a few rows at a time, never the 6 MB file


def test_module_docstrings(tmp_path):
    source = '"""Module doc."""\nclass Public:\n    """Class doc."""\n    def method(self):\n        """Method doc."""\n' \
             'def _private():\n    """Hidden."""\ndef func():\n    """Func doc."""\nimport antigravity\n'
    (tmp_path / "m.py").write_text(source)
    assert module_docstrings(tmp_path / "m.py", "pkg.m") == \
        "pkg.m\n\nModule doc.\n\nclass Public\nClass doc.\n\ndef Public.method\nMethod doc.\n\ndef func\nFunc doc."
    (tmp_path / "broken.py").write_text("def (:\n")
    assert module_docstrings(tmp_path / "broken.py", "broken") == ""


def test_default_corpus_is_pythons_own_english_text():
    docs = list(default_corpus())
    labels = collections.Counter(d.label for d in docs)
    assert labels["pydoc-topic"] > 50 and labels["stdlib-docstrings"] > 300 and len(labels) == 2
    size = sum(len(d.text.encode("utf-8")) for d in docs)
    assert 1_000_000 < size < 5_000_000
    sources = [d.source for d in docs]
    assert len(set(sources)) == len(sources) and "stdlib:json/__init__.py" in sources
    assert not any("site-packages" in s or "/test/" in s for s in sources)
    assert any("JSON" in d.text for d in docs if d.source == "stdlib:json/__init__.py")


records = st.lists(st.tuples(st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
                             st.sampled_from(["pos", "neg", "1"])), max_size=8)


@given(rows=records)
def test_round_trip_through_every_record_format(tmp_path_factory, rows):
    """Whatever the text (quotes, commas, newlines, NUL, any script), what a standard writer wrote
    is what comes back, with its label and in order, from CSV, JSON Lines, a JSON array, and gzip."""
    folder = tmp_path_factory.mktemp("formats")
    with open(folder / "a.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    objects = [{"text": text, "label": label} for text, label in rows]
    (folder / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    (folder / "a.json").write_text(json.dumps(objects, indent=1, ensure_ascii=False), encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objects))
    for name in ("a.csv", "a.jsonl", "a.json", "b.jsonl.gz"):
        docs = list(read_documents(SourceConfig(input=[str(folder / name)], label_field="label"), progress=False))
        assert [(d.text, d.label) for d in docs] == rows, name


def gzip_cut_short(data: bytes) -> bytes:
    whole = gzip.compress(data)
    return whole[: len(whole) // 2]


def gzip_damaged(data: bytes) -> bytes:
    whole = bytearray(gzip.compress(data))
    whole[20] ^= 0xFF  # inside the deflate stream: zlib.error ("invalid ...") or a CRC mismatch
    return bytes(whole)


@pytest.mark.parametrize("damage", [gzip_cut_short, gzip_damaged, lambda data: b"\x1f\x8b" + b"not really gzip"])
@pytest.mark.parametrize("name,options", [("a.txt.gz", {}), ("a.json.gz", {}), ("a.txt.gz", {"doc_sep": "line"}),
                                          ("a.jsonl.gz", {}), ("a.csv.gz", {})])
def test_damaged_gzip_is_a_data_error_naming_the_file(tmp_path, damage, name, options):
    """Every reader (whole-file text, JSON array and its first-character probe, the line readers)
    turns a truncated or corrupt .gz into a DataError that names the file, never a traceback."""
    records = [{"text": f"document number {i} " * 20} for i in range(300)]
    plain = {"a.json.gz": json.dumps(records), "a.csv.gz": "text\n" + "".join(f"row {i} " * 20 + "\n" for i in range(300))}
    content = plain.get(name, "".join(json.dumps(r) + "\n" for r in records)).encode()
    with pytest.raises(DataError, match=rf"{re.escape(name)}: cannot read"):
        read(tmp_path, name, damage(content), **options)


@pytest.fixture
def short_server():
    """A local HTTP server that announces 1,000 bytes (Content-Length) and sends 100: a dropped
    connection, as a download cut off halfway looks."""

    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"text": "cut"}\n' * 6 + b"{")  # 97 bytes
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_cut_off_download_is_never_cached_as_complete(tmp_path, short_server):
    with pytest.raises(DataError, match=r"data.jsonl: download cut short: received 97 of the 1,000 bytes"):
        fetch(f"{short_server}/data.jsonl", tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache" / "downloads").iterdir())  # neither a cached file nor a partial one


def test_format_of_a_url_comes_from_its_path(tmp_path, http_folder):
    site, base, _ = http_folder
    (site / "data.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert detect_format(f"{base}/data.jsonl?download=true") == "jsonl"
    assert detect_format("https://h/x.csv.gz?a=b.txt#frag") == "csv"
    config = SourceConfig(input=[f"{base}/data.jsonl?download=true"], cache_dir=tmp_path / "cache")
    assert [d.text for d in read_documents(config, progress=False)] == ["one", "two"]


@pytest.mark.parametrize("doc_sep,content,expected", [
    # one document per line: the lines after a bad one keep their own numbers
    ("line", b"a\n\xff\nc\nd", [("a", 1), ("bad", 2), ("c", 3), ("d", 4)]),
    # paragraphs: the paragraph holding the bad line is one bad record, not a kept remnant and a bad record
    ("blank", b"p1\nbad \xff\np1 end\n\np2\n", [("bad", 2), ("p2\n", 5)]),
    ("blank", b"\xfe first\nnext\n\n\nlast", [("bad", 1), ("last", 5)]),
    # a literal separator, also one that sits on the bad line itself
    ("<|endoftext|>", b"one\n<|endoftext|>two\nbad \xff\n<|endoftext|>three\n",
     [("one\n", 1), ("bad", 3), ("three\n", 4)]),
    ("<|endoftext|>", b"a<|endoftext|>\xff<|endoftext|>b\nc<|endoftext|>d",
     [("a", 1), ("bad", 1), ("b\nc", 1), ("d", 2)]),
])
def test_skipped_undecodable_lines_in_text_files(tmp_path, doc_sep, content, expected):
    """With on_bad=skip every document is either kept or one bad record, and is numbered by the line
    of the file it starts on (a bad record: the bad line's)."""
    items = read(tmp_path, "a.txt", content, doc_sep=doc_sep, on_bad="skip")
    got = [("bad" if isinstance(item, BadRecord) else item.text, int(item.source.rsplit(":", 1)[1]))
           for item in items]
    assert got == expected
    bad = [item for item in items if isinstance(item, BadRecord)]
    assert all("bytes are not UTF-8" in item.message for item in bad)


@pytest.mark.parametrize("content,message", [
    ('text,label\nok,a\n"unclosed,b\nfine,c\nmore,d\n',
     r"a.csv:3: expected 2 fields \(text, label\), got 1; the quoted field opened at line 3 never closes: "
     r"it runs to the end of the file \(line 5\)"),
    # the right number of fields, but only because the open quote took in the rest of the file
    ('text,label\nok,a\nx,"unclosed\nfine,c\nmore,d', r"a.csv:3: the quoted field opened at line 3 never closes: "
     r"it runs to the end of the file \(line 5\)"),
    ('text,label\nok,a\nx,"unclosed', r"a.csv:3: the quoted field opened at line 3 never closes"),
    ('text,label\nok,a\n"multi\nline",b,extra\n', r"a.csv:3: expected 2 fields \(text, label\), got 3; "
     r"the quoted field opened at line 3 runs on to line 4"),
])
def test_unclosed_csv_quote_says_where_it_opened(tmp_path, content, message):
    with pytest.raises(DataError, match=message):
        read(tmp_path, "a.csv", content)


def test_quoted_fields_over_lines_at_the_end_of_a_file_are_fine(tmp_path):
    docs = read(tmp_path, "a.csv", 'text,label\n"multi\nline, ""quoted""",b', label_field="label")
    assert [(d.text, d.label) for d in docs] == [('multi\nline, "quoted"', "b")]
