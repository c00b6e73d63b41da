"""Task sets (issue 25 item 3, the paper's SKD over all its tasks): several tasks distilled into
one student, one sense dictionary over the members' gathered states, one prompt per member task
in the exported SentenceTransformer folder, which the evaluation selects by the task mteb runs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from embdistill.artifacts import read_manifest, save_json
from embdistill.drivers import main as drive
from embdistill.errors import UserError
from embdistill.input_format import format_example
from embdistill.paths import Paths
from embdistill.senses.combine import combined_artifact
from embdistill.tasks import resolve_task_set
from embdistill.texts import read_train_texts

# two user tasks, each with its own instruction in its examples (user files get their task
# type's, the same for both: each test set writes its own)
INSTRUCTIONS = {"sports": "Classify the sports story", "money": "Say what the money story is about"}


def test_a_task_set_has_one_folder_name_whatever_the_order():
    assert resolve_task_set(["tweet-sentiment", "bbc-news"]).slug == "bbc-news+tweet-sentiment"
    assert resolve_task_set(["bbc-news", "tweet-sentiment"]).member_slugs == ("bbc-news", "tweet-sentiment")
    assert resolve_task_set(["all"]).slug == "all" and len(resolve_task_set(["all"]).members) == 16
    assert resolve_task_set([str(i) for i in range(16, 0, -1)]).slug == "all"
    one = resolve_task_set(["bbc-news"])
    assert one.slug == "bbc-news" and one.member_slugs == ()  # one task: its own files, as before
    with pytest.raises(UserError, match="the task NewsClassification is given twice"):
        resolve_task_set(["9", "NewsClassification"])


def write_task(base: Path, task: str, texts: list[str]) -> None:
    """Stage 0's train.json of a task, its examples carrying the task's own instruction."""
    save_json([format_example(INSTRUCTIONS[task], text) for text in texts], Paths(base, task).train_json)


def texts_of(topic: str, words: list[str], n: int = 24) -> list[str]:
    return [f"the {' and the '.join(words[(i * 3 + j) % len(words)] for j in range(4))} {topic} story {i}"
            for i in range(n)]


SPORTS = texts_of("sports", ["team", "match", "goal", "player", "coach", "league"])
MONEY = texts_of("money", ["bank", "price", "market", "stock", "loan", "profit"])


@pytest.fixture(scope="module")
def set_pipeline(tmp_path_factory, tiny_bert_dir):
    """Both tasks through the SKD drivers as one task set (each task gathered on its own)."""
    base = tmp_path_factory.mktemp("task-set")
    write_task(base, "sports", SPORTS)
    write_task(base, "money", MONEY)
    common = ["--base-dir", str(base), "--teacher", str(tiny_bert_dir)]
    tasks = []  # user files name the tasks (stage 0 would read them; train.json is written above)
    for task in ("sports", "money"):
        (base / f"{task}.jsonl").write_text(json.dumps({"text": "a", "label": "b"}) + "\n")
        tasks.append(str(base / f"{task}.jsonl"))
    assert drive(["gather_sense", *tasks, *common, "--max-length", "32", "--batch-size", "16",
                  "--per-token", "20"]) == 0
    assert drive(["sep_cluster", *tasks, *common, "--senses", "2"]) == 0
    assert drive(["train", *tasks, *common, "--loss", "sense", "--student-layers", "1", "--max-steps", "2", "--batch-size", "4",
                  "--max-length", "32", "--val-fraction", "0"]) == 0
    return tasks, common, Paths(base, "money+sports", tiny_bert_dir.name, members=("money", "sports"))


def test_the_skd_drivers_take_several_tasks_as_one_task_set(set_pipeline):
    _, _, paths = set_pipeline
    for task in ("money", "sports"):  # each task's own gather and combine, reused by the set
        assert paths.member(task).combined.is_file()
    assert paths.sense_dict.is_file() and paths.targets.is_file()
    combined = read_manifest(combined_artifact(paths.combined))  # records every member's gathered files
    assert {Path(p).parts[-4] for p in combined["config"]["inputs"]} == {"money", "sports"}
    assert len(read_train_texts(paths)) == len(SPORTS) + len(MONEY)
    st = json.loads((paths.export_st / "config_sentence_transformers.json").read_text())
    # one prompt per member task, under its name, as the plain input format prefixes a text
    # (sentence-transformers adds empty query and document prompts of its own)
    assert {name: prompt for name, prompt in st["prompts"].items() if prompt} == {
        task: f"{instruction} " for task, instruction in INSTRUCTIONS.items()}
    assert st.get("default_prompt_name") is None


def test_mteb_gives_each_task_its_own_prompt_from_a_task_set_s_student(set_pipeline):
    """mteb 2.x selects a SentenceTransformer prompt by the task name it passes; it keeps only
    names of tasks it has registered, so our evaluation names each evaluated task's prompt."""
    from sentence_transformers import SentenceTransformer

    from embdistill.evaluation.models import PlainTextEncoder
    from embdistill.evaluation.specs import parse_model_spec

    _, _, paths = set_pipeline
    model = SentenceTransformer(str(paths.export_st), device="cpu")
    spec = parse_model_spec(f"skd-all=st:{paths.export_st}")
    encoder = PlainTextEncoder(spec, model, batch_size=8, max_length=32,
                               prompt_tasks={"sports": "sports", "sports-clustering": "sports", "money": "money"})
    texts = SPORTS[:5]

    def mteb_encode(task_name: str, task_type: str) -> np.ndarray:
        from datasets import Dataset
        from torch.utils.data import DataLoader

        metadata = SimpleNamespace(name=task_name, type=task_type, modalities=["text"])
        return encoder.encode(DataLoader(Dataset.from_dict({"text": texts}), batch_size=8),
                              task_metadata=metadata, hf_split="test", hf_subset="default")

    for task_name, task_type, task in [("sports", "Classification", "sports"),
                                       ("sports-clustering", "Clustering", "sports"),
                                       ("money", "Classification", "money")]:
        expected = model.encode(texts, prompt=f"{INSTRUCTIONS[task]} ")
        assert np.allclose(mteb_encode(task_name, task_type), expected, atol=1e-5), task_name
    assert not np.allclose(model.encode(texts, prompt=f"{INSTRUCTIONS['sports']} "),
                           model.encode(texts, prompt=f"{INSTRUCTIONS['money']} "), atol=1e-5)


def test_a_member_s_new_texts_redo_the_set_s_dictionary(set_pipeline):
    tasks, common, paths = set_pipeline
    before = paths.sense_dict.stat().st_mtime_ns
    assert drive(["sep_cluster", *tasks, *common, "--senses", "2"]) == 0
    assert paths.sense_dict.stat().st_mtime_ns == before  # done: skipped
    write_task(paths.base, "money", MONEY[:20])
    assert drive(["gather_sense", *reversed(tasks), *common, "--max-length", "32", "--batch-size", "16",
                  "--per-token", "20"]) == 0
    assert drive(["sep_cluster", *reversed(tasks), *common, "--senses", "2"]) == 0
    assert paths.sense_dict.stat().st_mtime_ns != before
