"""train.json read lazily (issue 26): any layout of a JSON list of strings, malformed files
refused in one line, and a rank's share read under an address-space limit that the whole file
does not fit in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from embdistill.artifacts import save_json
from embdistill.errors import UserError
from embdistill.input_format import format_example
from embdistill.paths import Paths
from embdistill.texts import JsonTextList, read_train_texts
from test_train_stage import subprocess_env

TEXTS = ['a "quoted" text', "back\\slash", "line\nbreak and é ü 中文", "", "x" * 3000]


@pytest.mark.parametrize("layout", ["save_json", "one line", "compact utf-8"])
def test_reads_every_layout_of_the_list(tmp_path, layout, monkeypatch):
    """One text per line (save_json, what stage 0 writes), all on one line (the original's
    files), and compact UTF-8; read blocks smaller than a text, so texts straddle them."""
    monkeypatch.setattr("embdistill.texts._READ_BLOCK", 7)
    path = tmp_path / "train.json"
    if layout == "save_json":
        save_json(TEXTS, path)
    else:
        compact = layout == "compact utf-8"
        path.write_text(json.dumps(TEXTS, ensure_ascii=not compact, separators=(",", ":") if compact else None),
                        encoding="utf-8")
    texts = JsonTextList(path)
    assert len(texts) == 5 and list(texts) == TEXTS
    assert texts[-1] == TEXTS[-1] and texts[1::2] == TEXTS[1::2] and texts[2] == TEXTS[2]
    with pytest.raises(IndexError):
        texts[5]


@pytest.mark.parametrize("content", ['', '[', '["a"', '["a",]', '["a" "b"]', '[1]', '{"a": "b"}',
                                     '["a"] x', '[["a"]]', '["a\\"]'])
def test_refuses_what_is_not_a_list_of_strings(tmp_path, content):
    path = tmp_path / "train.json"
    path.write_text(content)
    with pytest.raises(UserError, match="expected a JSON list of strings") as refused:
        JsonTextList(path)
    assert len(str(refused.value).splitlines()) == 1


def test_a_file_changed_under_the_reader_is_refused(tmp_path):
    paths = Paths(tmp_path, "bbc-news")
    save_json(["one", "two"], paths.train_json)
    texts = read_train_texts(paths)
    save_json(["one", "two", "three"], paths.train_json)
    with pytest.raises(UserError, match="changed while it was being read"):
        texts[0]


MEMORY_CHILD = """
import resource, sys
from pathlib import Path
from embdistill.artifacts import load_json
from embdistill.distributed import DistEnv, shard
from embdistill.paths import Paths
from embdistill.texts import instruction_of, read_train_texts

def vm_size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

mode, headroom, base = sys.argv[1:]
paths = Paths(Path(base), "bbc-news")
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(headroom), resource.RLIM_INFINITY))
if mode == "whole":  # the control: the file as one JSON value, as every rank read it before
    examples = load_json(paths.train_json)
else:  # rank 1 of 4, as the gather takes its share: parts of 256 texts
    examples = read_train_texts(paths)
    instruction = instruction_of(examples)
    mine = shard(list(range(len(examples))), DistEnv(rank=1, world_size=4))
    chars = sum(len(examples[i]) for start in range(0, len(mine), 256) for i in mine[start:start + 256])
    print(len(examples), len(mine), chars, instruction)
"""


def test_a_rank_reads_its_share_under_a_memory_limit(tmp_path):
    """64 MB of training texts (120,000 of 550 characters) under an address-space limit of 32 MB
    above the child's own after its imports: reading the file whole (the control, as
    read_train_texts did in every rank) fails under it; the lazy read of one rank's share does not."""
    paths = Paths(tmp_path, "bbc-news")
    save_json([format_example("Classify the topic", f"text {i:06d} " + "word " * 108) for i in range(120_000)],
              paths.train_json)

    def child(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(32 << 20), str(tmp_path)],
                              capture_output=True, text=True, timeout=120, env=subprocess_env())

    control = child("whole")
    assert control.returncode != 0 and "MemoryError" in control.stderr
    lazy = child("lazy")
    assert lazy.returncode == 0, lazy.stderr[-2000:]
    assert lazy.stdout.split() == ["120000", "30000", str(30_000 * len(format_example("Classify the topic", "text 000000 " + "word " * 108))), "Classify", "the", "topic"]
