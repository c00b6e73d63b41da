"""Stage 3 end to end: scripts/05_train.py (and run_train.sh) on a tiny random BERT.

The inputs are built here: train.json from a few sentences, and a sense dictionary whose
senses are the tiny teacher's own states of each token (up to 3 per token), so that the
sense targets are meaningful. Everything runs on the CPU in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from embdistill.artifacts import save_json, save_pickle, write_manifest
from embdistill.errors import UserError
from embdistill.paths import Paths
from embdistill.distributed import DistEnv
from embdistill.objectives import StateMatching
from embdistill.objectives.base import example_collator
from embdistill.students import build_student, default_teacher_device, export_student
from embdistill.teachers import load_teacher
from embdistill.input_format import format_example
from embdistill.metrics_plot import read_metrics
from helpers import free_port, killed_command, run_stage

REPO = Path(__file__).resolve().parents[1]
PINNED = Path(__file__).parent / "data" / "pinned_train_run.json"
SENTENCES = [
    "the team won the game in the last minute",
    "the market price of the bank fell again",
    "a good movie review and a bad one",
    "the cat sat on the mat with the dog",
    "money is tight and the price is high",
    "the news of the day is about the music",
    "this sentence is about sport and the team",
    "hello world the market is open today",
    "the bank lost money on the market",
    "a bad game for the team that lost",
    "the dog and the cat watched a movie",
    "music and sport are in the news",
]
# The pinned run: 12 examples, batch 2, 2 epochs = 12 steps; checkpoints at 4, 6, 8, 12.
PINNED_ARGS = ["--student-layers", "1", "--epochs", "2", "--batch-size", "2", "--lr", "2e-3",
               "--warmup-steps", "2", "--max-length", "32", "--log-every", "1", "--save-every", "4",
               "--seed", "0"]


def make_inputs(base: Path, teacher_dir: Path, task: str = "bbc-news", senses_per_token: int = 3) -> Paths:
    """train.json for ``task``, a sense dictionary made of the teacher's own token states and
    its sense targets (scripts/04_targets.py)."""
    teacher = load_teacher(str(teacher_dir), device="cpu")
    paths = Paths(base, task, teacher.slug)
    examples = [format_example("Classify the topic of the given news article", s) for s in SENTENCES]
    save_json(examples, paths.train_json)
    batch = teacher.tokenize(examples, 32)
    states = teacher.token_states(batch)
    gathered: dict[int, list[np.ndarray]] = {}
    for token, state, text in zip(batch["input_ids"].flatten(), states.flatten(0, 1),
                                  batch["embed_mask"].flatten()):
        if text:
            gathered.setdefault(int(token), []).append(state.numpy())
    senses = {token: np.stack(vectors[:: max(1, len(vectors) // senses_per_token)][:senses_per_token])
              .astype(np.float16) for token, vectors in gathered.items()}
    save_pickle(senses, paths.sense_dict)
    assert run_stage("scripts/04_targets.py", "--task", task, "--base-dir", base, "--teacher", teacher_dir,
                     "--max-length", "32") == 0
    return paths


def train_script(base: Path, teacher_dir: Path, *extra: str) -> list[str]:
    return ["--task", "bbc-news", "--base-dir", str(base), "--teacher", str(teacher_dir), "--loss", "sense", *extra]


def run_in_process(args: list[str], capsys) -> tuple[int, str]:
    """scripts/05_train.py in this process: its exit status and stderr."""
    code = run_stage("scripts/05_train.py", *args)
    return code, capsys.readouterr().err


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def script_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "05_train.py"), *args]


# ------------------------------------------------------------------------------------------
# the pinned run, its outputs and its export


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory, tiny_bert_dir):
    base = tmp_path_factory.mktemp("pinned")
    paths = make_inputs(base, tiny_bert_dir)
    assert run_stage("scripts/05_train.py", *train_script(base, tiny_bert_dir, *PINNED_ARGS)) == 0
    return Paths(base, paths.task, paths.teacher, "skd")


def test_the_pinned_run_reproduces_its_stored_losses(pinned_run):
    """The stored losses were produced with the versions in the file's ``produced_with``
    (torch 2.13.0 CPU, transformers 5.24.0, what setup.sh installs); rtol 1e-5 tolerates
    float rounding across machines and nearby versions of those, not a change to the loop,
    the loss, the targets or the inputs. On a failure the message names both versions."""
    import transformers

    rows = read_metrics(pinned_run.run_dir / "metrics.jsonl")
    assert [row["step"] for row in rows] == list(range(1, 13))
    pinned = json.loads(PINNED.read_text())
    assert pinned["args"] == PINNED_ARGS
    running = {"torch": torch.__version__, "transformers": transformers.__version__}
    measured = {"loss": [row["loss"] for row in rows], "sense_accuracy": [row["sense_accuracy"] for row in rows]}
    for name, values in measured.items():
        np.testing.assert_allclose(values, pinned[name], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{name} changed; measured {values} with {running}, "
                                           f"pinned with {pinned['produced_with']}")


def test_the_run_folder_holds_config_checkpoints_plot_and_manifest(pinned_run):
    run = pinned_run.run_dir
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["student_layers"] == 1 and config["run"]["loss"] == "sense"
    assert config["train"]["lr"] == 2e-3 and config["train"]["world_size"] == 1 and config["total_steps"] == 12
    assert sorted(p.name for p in pinned_run.checkpoint_dir.iterdir()) == ["step-00000008.pt", "step-00000012.pt"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads((run / "export.manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["extra"]["global_step"] == 12


def test_the_export_holds_the_trained_student(pinned_run, tiny_bert_dir):
    """Both folders hold the trained weights (the last checkpoint's), not the teacher's: the
    layer count is the student's and token states / embeddings equal the student's."""
    from sentence_transformers import SentenceTransformer

    from embdistill.teachers import mean_pool

    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    student = build_student(teacher, 1)
    state = torch.load(pinned_run.checkpoint_dir / "step-00000012.pt", weights_only=True)
    student.load_state_dict(state["model"])
    student.eval()
    untrained = build_student(teacher, 1).eval()

    exported = load_teacher(str(pinned_run.export_dir / "hf"), device="cpu")
    assert exported.model.config.num_hidden_layers == 1
    batch = exported.tokenize(["Classify: !@#$%^&*()the team won", "the bank fell"], 32)
    with torch.no_grad():
        expected = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        before = untrained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(exported.token_states(batch), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, before, atol=1e-3)  # training changed the weights

    st = SentenceTransformer(str(pinned_run.export_dir / "st"), device="cpu")
    texts = ["the team won the game", "money is tight"]
    examples = [format_example("Classify the topic of the given news article", t) for t in texts]
    plain = exported.tokenize(examples, 32)  # the instruction is the folder's default prompt
    with torch.no_grad():
        states = student(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).last_hidden_state
    np.testing.assert_allclose(st.encode(texts), mean_pool(states, plain["embed_mask"]).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_a_finished_run_is_skipped(pinned_run, tiny_bert_dir, capsys):
    args = train_script(pinned_run.base, tiny_bert_dir, *PINNED_ARGS)
    before = (pinned_run.export_dir / "hf" / "model.safetensors").stat().st_mtime_ns
    code, err = run_in_process(args, capsys)
    assert code == 0 and "up to date" in err
    assert (pinned_run.export_dir / "hf" / "model.safetensors").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------
# the pooled objectives: pooled-mse, sense-pooled


def test_sense_pooled_with_sentence_weight_0_trains_as_the_sense_loss(pinned_run, tiny_bert_dir, capsys):
    """The same losses, sense accuracies and weights as the pinned sense run, to the bit; the
    pooled term is logged, and the weight is in this run's identity only."""
    args = train_script(pinned_run.base, tiny_bert_dir, *PINNED_ARGS, "--loss", "sense-pooled",
                        "--sentence-weight", "0")
    code, err = run_in_process(args, capsys)
    assert code == 0, err
    run = Paths(pinned_run.base, pinned_run.task, pinned_run.teacher, "skd-pooled")
    sense_rows, rows = read_metrics(pinned_run.run_dir / "metrics.jsonl"), read_metrics(run.run_dir / "metrics.jsonl")
    assert [row["loss"] for row in rows] == [row["loss"] for row in sense_rows]
    assert [row["sense_accuracy"] for row in rows] == [row["sense_accuracy"] for row in sense_rows]
    assert all(row["pooled_mse"] > 0 for row in rows)
    last = "step-00000012.pt"
    trained = torch.load(run.checkpoint_dir / last, weights_only=True)["model"]
    for name, value in torch.load(pinned_run.checkpoint_dir / last, weights_only=True)["model"].items():
        assert torch.equal(trained[name], value), name
    assert json.loads((run.run_dir / "config.json").read_text())["run"]["sentence_weight"] == 0
    assert "sentence_weight" not in json.loads((pinned_run.run_dir / "config.json").read_text())["run"]
    assert (run.export_dir / "st-replace" / "modules.json").is_file()


@pytest.fixture(scope="module")
def far_teacher_dir(tmp_path_factory, tiny_bert_dir) -> Path:
    """The tiny BERT with a second layer that matters (the random one barely moves the pooled
    embedding: its first layer alone starts at a pooled-mse of 0.003) and a Normalize module."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("far-teacher") / "far-bert"
    shutil.copytree(tiny_bert_dir, folder)
    model = BertModel.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.encoder.layer[1].parameters():
            parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "2_Normalize").mkdir()
    return folder


POOLED_ARGS = ["--student-layers", "1", "--epochs", "3", "--batch-size", "3", "--lr", "2e-3", "--warmup-steps", "0",
               "--max-length", "32", "--log-every", "1", "--val-texts", "3", "--val-every", "1", "--keep-best", "loss"]


def test_pooled_mse_trains_validates_and_exports_what_it_trained(tmp_path, far_teacher_dir, capsys):
    """The validation loss falls from the untrained start, and the kept step's is the squared
    distance of sentence-transformers' embeddings of the held-out texts by the exported folder
    and by the teacher's own folder (normalised: 2 - 2 cos)."""
    from sentence_transformers import SentenceTransformer

    paths = Paths(tmp_path, "bbc-news", far_teacher_dir.name)
    save_json([format_example("Classify the topic of the given news article", s) for s in SENTENCES], paths.train_json)
    code, err = run_in_process(train_script(tmp_path, far_teacher_dir, *POOLED_ARGS, "--loss", "pooled-mse"), capsys)
    assert code == 0, err
    run = Paths(tmp_path, paths.task, paths.teacher, "pooled-mse")
    selection = json.loads((run.run_dir / "selection.json").read_text())
    scores = {row["step"]: row["loss"] for row in selection["scores"]}
    assert selection["kept_step"] > 0 and selection["kept_score"] < 0.8 * scores[0]
    train_losses = [row["loss"] for row in read_metrics(run.run_dir / "metrics.jsonl") if "loss" in row]
    assert len(train_losses) == 9 and train_losses[-1] < train_losses[0]

    examples = json.loads(paths.train_json.read_text())
    texts = [examples[i].split("!@#$%^&*()")[1] for i in selection["validation"]["indices"]]
    exported = SentenceTransformer(str(run.export_dir / "st"), device="cpu")
    whole = SentenceTransformer(str(far_teacher_dir), device="cpu")
    whole[1].include_prompt = False  # the prompt's tokens out of the mean, as the export's pooling
    student, teacher = (torch.from_numpy(exported.encode(texts)),
                        torch.from_numpy(whole.encode(texts, prompt=exported.prompts["task"])))
    expected = torch.nn.functional.mse_loss(student, teacher, reduction="sum") / len(texts)
    assert float(expected) == pytest.approx(selection["kept_score"], rel=1e-4)


def test_sense_pooled_trains_and_its_sentence_weight_is_in_the_run_identity(stage_inputs, tiny_bert_dir, capsys):
    args = train_script(stage_inputs.base, tiny_bert_dir, *POOLED_ARGS, "--loss", "sense-pooled")
    code, err = run_in_process(args, capsys)
    assert code == 0, err
    run = Paths(stage_inputs.base, stage_inputs.task, stage_inputs.teacher, "skd-pooled")
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    trained = [row for row in rows if "loss" in row]
    assert len(trained) == 9 and all(row["loss"] > row["pooled_mse"] > 0 for row in trained)  # sense + 1 x pooled
    validated = [row for row in rows if "val/loss" in row]
    assert validated[0]["step"] == 0 and {"val/sense_accuracy", "val/pooled_mse"} <= set(validated[0])
    assert json.loads((run.run_dir / "config.json").read_text())["run"]["sentence_weight"] == 1.0

    code, err = run_in_process(args, capsys)
    assert code == 0 and "up to date" in err
    code, err = run_in_process([*args, "--sentence-weight", "0.5"], capsys)
    assert code == 2 and "sentence_weight: 1.0 -> 0.5" in err
    code, err = run_in_process([*args, "--sentence-weight", "-1"], capsys)
    assert code == 2 and "--sentence-weight" in err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------
# kill -9 and resume


def _wait_for(predicate, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_result(tmp_path, tiny_bert_dir, capsys):
    long_run = ["--student-layers", "1", "--epochs", "20", "--batch-size", "2", "--lr", "1e-3",
                "--warmup-steps", "5", "--max-length", "32", "--save-every", "5", "--log-every", "5"]
    killed_args = train_script(tmp_path / "killed", tiny_bert_dir, *long_run)
    checkpoints = make_inputs(tmp_path / "killed", tiny_bert_dir).checkpoint_dir
    process = subprocess.Popen(script_command(*killed_args), env=subprocess_env(), stderr=subprocess.PIPE,
                               text=True)
    _wait_for(lambda: any(checkpoints.glob("step-*.pt")), process, timeout=120)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.stem.split("-")[1]) for p in checkpoints.glob("step-*.pt"))
    assert 0 < killed_at < 120, "the kill came too late to test resuming"

    # the same command again (in this process, with the same single thread as the subprocess)
    code, err = run_in_process(killed_args, capsys)
    assert code == 0 and f"resumed from {checkpoints / f'step-{killed_at:08d}.pt'}" in err

    make_inputs(tmp_path / "whole", tiny_bert_dir)
    assert run_in_process(train_script(tmp_path / "whole", tiny_bert_dir, *long_run), capsys)[0] == 0
    final = "step-00000120.pt"
    resumed_state = torch.load(checkpoints / final, weights_only=True)
    whole_state = torch.load(tmp_path / "whole" / checkpoints.relative_to(tmp_path / "killed") / final,
                             weights_only=True)
    for key, value in whole_state["model"].items():
        torch.testing.assert_close(resumed_state["model"][key], value, rtol=1e-6, atol=1e-7)
    steps = [row["step"] for row in read_metrics(checkpoints.parent / "metrics.jsonl")]
    assert steps == list(range(5, 121, 5))  # no duplicated rows from before the kill


# ------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def stage_inputs(tmp_path, tiny_bert_dir) -> Paths:
    return make_inputs(tmp_path, tiny_bert_dir)


def test_a_dictionary_of_another_teacher_is_refused(stage_inputs, tiny_bert_dir, capsys):
    save_pickle({5: np.ones((2, 48), np.float16)}, stage_inputs.sense_dict)
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir, "--max-steps", "1"), capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "another teacher" in err
    assert not Paths(stage_inputs.base, stage_inputs.task, stage_inputs.teacher, "skd").run_dir.exists()


def test_a_dictionary_built_with_another_teacher_of_the_same_size_is_refused(stage_inputs, tiny_bert_dir, capsys):
    """Same hidden size, so only the manifest tells (on main it trained on the wrong targets)."""
    write_manifest(stage_inputs.sense_dict, stage="cluster", config={"teacher": "another-teacher"})
    args = train_script(stage_inputs.base, tiny_bert_dir, "--max-steps", "1", "--max-length", "32")
    code, err = run_in_process(args, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: {stage_inputs.sense_dict} was built with teacher 'another-teacher', not '{stage_inputs.teacher}': "
        f"use a dictionary of '{stage_inputs.teacher}', or pass --allow-teacher-mismatch if both name the same model")
    code, err = run_in_process([*args, "--allow-teacher-mismatch"], capsys)
    assert code == 0, err[-2000:]


def test_replace_mode_refuses_a_dictionary_of_another_teacher(pinned_run, tiny_bert_dir, tmp_path):
    """The student's teacher comes from its export manifest; the teacher's is the teacher."""
    other = tmp_path / "other.kmeanspkl"
    shutil.copy(pinned_run.sense_dict, other)
    write_manifest(other, stage="cluster", config={"teacher": "another-teacher"})
    student = pinned_run.export_dir / "hf"
    for spec in (f"replace:{student}@{other}", f"replace:{tiny_bert_dir}@{other}"):
        result = subprocess.run([sys.executable, str(REPO / "scripts" / "06_evaluate.py"), "--base-dir",
                                 str(tmp_path), "--task", "bbc-news", "--models", spec],
                                capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert f"was built with teacher 'another-teacher', not '{pinned_run.teacher}'" in result.stderr
    assert json.loads((pinned_run.run_dir / "export.manifest.json").read_text())["extra"]["teacher"] == \
        pinned_run.teacher


def test_a_student_whose_weights_are_not_finite_is_not_exported(tiny_bert_dir, tmp_path):
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    student = build_student(teacher, 1)
    with torch.no_grad():
        student.embeddings.word_embeddings.weight[3, 0] = float("nan")
    with pytest.raises(UserError, match=f"not exporting to {tmp_path / 'export'}: the student's parameters are "
                                        r"not finite \(embeddings.word_embeddings.weight\)"):
        export_student(student, teacher.tokenizer, tmp_path / "export", normalize=False)
    assert list(tmp_path.iterdir()) == []


def test_a_finished_run_is_redone_for_a_dictionary_recorded_with_another_rule(stage_inputs, tiny_bert_dir, capsys):
    """The rule lives in the dictionary's manifest, outside the fingerprints of the dictionary
    and (when the targets happen to agree) of the targets: training must not skip, must refuse
    targets of the old rule by name, and trains once they are redone."""
    args = train_script(stage_inputs.base, tiny_bert_dir, "--max-length", "32", "--max-steps", "1")
    assert run_in_process(args, capsys)[0] == 0
    assert "up to date" in run_in_process(args, capsys)[1]
    write_manifest(stage_inputs.sense_dict, stage="cluster", config={"sense_rule": "cos"})
    code, err = run_in_process(args, capsys)
    assert code == 2 and "sense_rule 'dot', not 'cos'" in err.strip().splitlines()[-1]
    assert run_stage("scripts/04_targets.py", "--task", "bbc-news", "--base-dir", stage_inputs.base,
                     "--teacher", tiny_bert_dir, "--max-length", "32") == 0
    code, err = run_in_process(args, capsys)  # its checkpoint is of the dot run
    assert code == 2 and "(targets: " in err and "'sense_rule': 'dot'" in err and "'sense_rule': 'cos'" in err
    code, err = run_in_process([*args, "--overwrite"], capsys)
    assert code == 0 and "sense rule cos" in err, err[-1500:]
    config = json.loads((stage_inputs.run_dir / "config.json").read_text())
    assert config["run"]["sense_dict"]["sense_rule"] == "cos"


def test_the_recipe_gives_the_loops_defaults_and_an_explicit_option_wins(stage_inputs, tiny_bert_dir, capsys):
    def trained_with(run: str, *extra: str) -> dict:
        args = train_script(stage_inputs.base, tiny_bert_dir, "--student-layers", "1", "--max-length", "32",
                            "--max-steps", "1", "--val-fraction", "0", "--run", run, *extra)
        code, err = run_in_process(args, capsys)
        assert code == 0, err
        config = Paths(stage_inputs.base, stage_inputs.task, stage_inputs.teacher, run).run_dir / "config.json"
        return json.loads(config.read_text())["train"]

    measured = trained_with("measured")
    assert (measured["epochs"], measured["batch_size"], measured["lr"], measured["warmup_steps"]) == (2, 16, 3e-4, 10)
    paper = trained_with("paper", "--recipe", "paper")
    assert (paper["epochs"], paper["batch_size"], paper["lr"], paper["warmup_steps"]) == (5, 3, 5e-6, 300)
    explicit = trained_with("paper-lr", "--recipe", "paper", "--lr", "1e-4")
    assert (explicit["batch_size"], explicit["lr"]) == (3, 1e-4)
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir, "--recipe", "fast"), capsys)
    assert code == 2 and "--recipe" in err.strip().splitlines()[-1]


def test_lr_inf_is_refused_before_anything_runs(stage_inputs, tiny_bert_dir, capsys):
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir, "--lr", "inf"), capsys)
    assert code == 2 and err.strip() == "error: argument --lr: expected a finite number, got 'inf' (see 05_train.py --help)"
    assert not Paths(stage_inputs.base, stage_inputs.task, stage_inputs.teacher, "skd").run_dir.exists()


def test_missing_inputs_are_one_line_errors(stage_inputs, tiny_bert_dir, capsys):
    stage_inputs.sense_dict.unlink()
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir), capsys)
    assert code == 2 and f"error: missing sense dictionary {stage_inputs.sense_dict}" in err
    stage_inputs.train_json.unlink()
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir), capsys)
    assert code == 2 and "error: missing" in err and "00_texts.py" in err
    code, err = run_in_process(train_script(stage_inputs.base, tiny_bert_dir, "--batch-size", "0"), capsys)
    assert code == 2 and "error: argument --batch-size: expected a positive integer, got '0'" in err


def test_resuming_with_other_student_layers_is_refused(stage_inputs, tiny_bert_dir, capsys):
    args = train_script(stage_inputs.base, tiny_bert_dir, "--max-length", "32", "--max-steps", "2",
                        "--save-every", "1")
    assert run_in_process([*args, "--student-layers", "1"], capsys)[0] == 0
    code, err = run_in_process([*args, "--student-layers", "2", "--max-steps", "3"], capsys)
    assert code == 2 and "different run (student_layers: 1 -> 2)" in err
    code, err = run_in_process([*args, "--student-layers", "2", "--max-steps", "3", "--overwrite"], capsys)
    assert code == 0


def test_the_mse_teacher_runs_once_per_example_while_its_states_fit(tiny_bert_dir):
    """Kept teacher states give the loss the teacher would give, whatever a kept example is
    batched and padded with; the teacher runs only on the examples not kept."""
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    examples = ["a short one", "a somewhat longer text than that", "three", "the fourth text is the longest of all"]
    collate = example_collator(teacher.tokenize, examples, 32)
    student = build_student(teacher, 1).eval()

    def agree(loss_fn, batches):
        reference = StateMatching(teacher)  # no cache: the teacher on every batch
        for ids in batches:
            batch = collate(ids)
            with torch.no_grad():
                torch.testing.assert_close(loss_fn(student, batch).loss, reference(student, batch).loss,
                                           rtol=1e-5, atol=1e-7)
        assert reference.teacher_examples == sum(map(len, batches)) and not reference.kept

    kept = StateMatching(teacher, cache_bytes=2**30)
    agree(kept, [[0, 1], [2, 3], [3, 0], [1, 2], [0, 2]])  # the first two batches see every example
    assert kept.teacher_examples == 4 and sorted(kept.kept) == [0, 1, 2, 3]
    one = kept.kept[3].nbytes  # room for the longest example only
    tight = StateMatching(teacher, cache_bytes=one)
    agree(tight, [[3, 0], [3], [1, 3], [3, 2]])  # 3 kept; in a batch with others, only they run
    assert list(tight.kept) == [3] and tight.kept_bytes == one and tight.teacher_examples == 4


# ------------------------------------------------------------------------------------------
# two processes


def test_run_train_sh_trains_with_two_processes_and_the_mse_loss(stage_inputs, tiny_bert_dir):
    done = subprocess.run(
        [str(REPO / "run_train.sh"), "bbc-news", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "--base-dir", str(stage_inputs.base), "--teacher", str(tiny_bert_dir), "--loss", "mse",
         "--max-length", "32", "--batch-size", "2", "--max-steps", "4", "--log-every", "2"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = Paths(stage_inputs.base, stage_inputs.task, stage_inputs.teacher, "mse")
    config = json.loads((run.run_dir / "config.json").read_text())
    assert config["train"]["world_size"] == 2 and config["train"]["lr"] == pytest.approx(6e-4)  # 3e-4 x 2
    assert [row["step"] for row in read_metrics(run.run_dir / "metrics.jsonl")] == [2, 4]
    assert (run.export_dir / "st" / "modules.json").is_file()


def test_a_killed_peer_ends_the_other_rank_with_a_clear_error(stage_inputs, tiny_bert_dir):
    """Without torchrun's agent (as on another node): the survivor must not hang. Rank 1 is
    SIGKILLed as it starts its second checkpoint (a known point, however fast the machine);
    rank 0 then waits at a collective until gloo notices (at most --dist-timeout). The
    timeout below only guards against a hang."""
    args = train_script(stage_inputs.base, tiny_bert_dir, "--student-layers", "1", "--epochs", "200",
                        "--batch-size", "2", "--max-length", "32", "--save-every", "3",
                        "--dist-timeout", "20")
    port = str(free_port())
    commands = [script_command(*args),
                killed_command("embdistill.training", "Trainer", "_save_checkpoint", 2,
                               REPO / "scripts" / "05_train.py", *args)]
    ranks = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                              env={**subprocess_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r, command in enumerate(commands)]
    try:
        _, err = ranks[0].communicate(timeout=900)
        ranks[1].wait(timeout=60)
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: rank 0: lost contact with the other processes at step"), err[-2000:]
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------
# students


def test_a_llama_student_stays_bidirectional_and_round_trips(tiny_llama_dir, tmp_path):
    teacher = load_teacher(str(tiny_llama_dir), device="cpu")
    with pytest.raises(UserError, match="1 to 2 layers of the teacher, got 4"):  # Llama's default, as in the paper
        build_student(teacher)
    student = build_student(teacher, 1)
    assert type(student) is type(teacher.model)
    assert student.config.num_hidden_layers == 1
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())
    export_student(student, teacher.tokenizer, tmp_path / "export", normalize=False,
                   input_format=teacher.input_format)
    modules = json.loads((tmp_path / "export" / "st" / "modules.json").read_text())
    assert modules[0]["type"] == "embdistill.st_modules.Encoder"  # not a causal Llama (tests/test_export.py)
    loaded = load_teacher(str(tmp_path / "export" / "hf"), device="cpu")
    assert type(loaded.model).__name__ == "BidirectionalLlamaModel"
    batch = loaded.tokenize(["Represent this sentence: !@#$%^&*()the cat sat", "markets fell"], 32)
    student.eval()
    with torch.no_grad():
        expected = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(loaded.token_states(batch), expected, rtol=1e-5, atol=1e-6)
    # bidirectional: the first token's state depends on the last token
    changed = batch["input_ids"].clone()
    changed[0, -1] = (changed[0, -1] + 1) % loaded.model.config.vocab_size
    with torch.no_grad():
        other = student(input_ids=changed, attention_mask=batch["attention_mask"]).last_hidden_state
    assert not torch.allclose(other[0, 0], expected[0, 0])


def test_export_replaces_a_previous_export_whole(tiny_bert_dir, tmp_path):
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    export_student(build_student(teacher, 2), teacher.tokenizer, tmp_path / "export", normalize=True)
    export_student(build_student(teacher, 1), teacher.tokenizer, tmp_path / "export", normalize=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    modules = json.loads((tmp_path / "export" / "st" / "modules.json").read_text())
    assert modules[-1]["type"].endswith("Normalize")
    config = json.loads((tmp_path / "export" / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


# ------------------------------------------------------------------------------------------
# the real MiniLM


@pytest.mark.slow
def test_minilm_student_learns_the_senses_and_exports(tmp_path, minilm_dir, capsys):
    """A short real run: the 2-layer MiniLM student on the sense loss; its loss falls and its
    sense accuracy rises from the first epoch to the last, and the export encodes like it."""
    from sentence_transformers import SentenceTransformer

    paths = make_inputs(tmp_path, minilm_dir)
    args = train_script(tmp_path, minilm_dir, "--epochs", "4", "--batch-size", "3", "--lr", "1e-4",
                        "--warmup-steps", "2", "--max-length", "32", "--log-every", "1")
    code, err = run_in_process(args, capsys)
    assert code == 0, err[-2000:]
    rows = read_metrics(paths.run_dir / "metrics.jsonl")
    assert len(rows) == 16  # 12 examples / 3 per step x 4 epochs
    first, last = rows[:4], rows[-4:]
    assert np.mean([r["loss"] for r in last]) < 0.7 * np.mean([r["loss"] for r in first])
    assert np.mean([r["sense_accuracy"] for r in last]) > np.mean([r["sense_accuracy"] for r in first])
    st = SentenceTransformer(str(paths.export_dir / "st"), device="cpu")
    assert st[0].model.config.num_hidden_layers == 2
    embeddings = st.encode(["the team won the game", "the bank fell"])
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)  # MiniLM normalises


def test_the_teacher_gets_a_spare_gpu_per_process_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    rank1 = DistEnv(rank=1, local_rank=1, world_size=2)
    assert default_teacher_device(torch.device("cuda", 1), rank1, local_world_size=2) == torch.device("cuda", 3)
    # 3 processes on 4 GPUs: no spare GPU for rank 1, whose teacher shares its GPU
    assert default_teacher_device(torch.device("cuda", 1), rank1, local_world_size=3) == torch.device("cuda", 1)
    assert default_teacher_device(torch.device("cpu"), rank1, local_world_size=2) == torch.device("cpu")


def test_cls_pooled_export_embeds_with_the_first_token(tiny_bert_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    student = build_student(teacher, 1).eval()
    export_student(student, teacher.tokenizer, tmp_path / "export", normalize=False, pooling="cls")
    texts = ["the cat sat on the mat", "markets fell"]
    batch = teacher.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls_states = student(**batch).last_hidden_state[:, 0]
    encoded = SentenceTransformer(str(tmp_path / "export" / "st"), device="cpu").encode(
        texts, convert_to_tensor=True)
    torch.testing.assert_close(encoded, cls_states, rtol=1e-5, atol=1e-5)
