"""SKD's stored sense targets (scripts/04_targets.py, embdistill.senses.targets) on a tiny random
BERT: training on them equals training with targets computed on the fly, the stage resumes
after an interruption to the same file, 2 torchrun ranks equal 1, each sense rule's targets
are the brute-force argmax under the rule the dictionary records, the summary's single-sense
share is right, and a targets file made for another dictionary, sense rule, max length or
text is refused in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.bench_replace import reference_scores
from embdistill.artifacts import PartFiles, fingerprint, read_manifest, save_pickle, write_manifest
from embdistill.distributed import DistEnv
from embdistill.errors import UserError
from embdistill.losses import SenseLoss
from embdistill.senses.dictionary import SenseDictionary, load_sense_dict
from embdistill.senses.packed import SENSE_RULES, PackedSenses
from embdistill.senses.targets import (TargetCollator, TargetsConfig, compute_targets, load_targets,
                                       text_targets)
from embdistill.objectives import SenseDistillation
from embdistill.students import build_student
from embdistill.teachers import load_teacher
from embdistill.metrics_plot import read_metrics
from embdistill.train_config import TrainConfig
from embdistill.training import LossOutput, Trainer
from helpers import free_port, run_stage, save_dictionary
from test_train_stage import REPO, SENTENCES, make_inputs, subprocess_env

MAX_LENGTH = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert_dir):
    """A base dir with train.json, a dictionary of the teacher's own states and its targets."""
    base = tmp_path_factory.mktemp("targets")
    paths = make_inputs(base, tiny_bert_dir)
    teacher = load_teacher(str(tiny_bert_dir), device="cpu")
    from embdistill.texts import read_train_texts

    senses = PackedSenses(load_sense_dict(paths.sense_dict), teacher.vocab_size)
    return paths, teacher, senses, read_train_texts(paths)


def on_the_fly(teacher, senses):
    """The sense loss with targets chosen at every step by the frozen teacher."""
    def loss_fn(model, batch):
        states = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        targets = senses.targets(teacher.token_states(batch), batch["input_ids"], batch["embed_mask"])
        loss, accuracy, count = SenseLoss(senses)(states, batch["input_ids"], targets)
        return LossOutput(loss, count, {"sense_accuracy": accuracy})
    return loss_fn


def test_stored_targets_train_exactly_like_targets_on_the_fly(setup, tmp_path):
    paths, teacher, senses, examples = setup
    cfg = TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(paths.sense_dict))
    stored = load_targets(paths.targets, cfg, {"sense_dict": paths.sense_dict, "texts": paths.train_json},
                          senses, len(examples))
    assert (stored.targets >= 0).sum() > 20
    config = TrainConfig(epochs=2, batch_size=3, lr=2e-3, warmup_steps=1, log_every=1, save_every=100)
    runs = {}
    for name, loss_fn, dataset, collate in [
        ("stored", SenseDistillation(senses), list(range(len(examples))),
         TargetCollator(teacher.tokenize, examples, stored, MAX_LENGTH)),
        ("on_the_fly", on_the_fly(teacher, senses), examples, lambda items: teacher.tokenize(items, MAX_LENGTH)),
    ]:
        trainer = Trainer(build_student(teacher, 1), loss_fn, dataset, collate, config, tmp_path / name,
                          device="cpu", resume=False)
        trainer.train()
        runs[name] = (read_metrics(tmp_path / name / "metrics.jsonl"), trainer.module.state_dict())
    (stored_rows, stored_params), (fly_rows, fly_params) = runs["stored"], runs["on_the_fly"]
    assert len(stored_rows) == 8
    for key in ("loss", "sense_accuracy", "units_per_step", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in stored_rows], [r[key] for r in fly_rows], rtol=1e-6, atol=1e-8)
    for name, value in stored_params.items():
        torch.testing.assert_close(value, fly_params[name], rtol=1e-6, atol=1e-7)


def test_trainer_autocast_on_cpu_keeps_sense_logits_float32(setup, tmp_path):
    """The CUDA precision path (bf16 autocast) switched on for the CPU: the student runs in
    bf16, the sense logits and loss stay float32 and training proceeds."""
    paths, teacher, senses, examples = setup
    stored = load_targets(paths.targets, TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(paths.sense_dict)),
                          {"sense_dict": paths.sense_dict, "texts": paths.train_json}, senses, len(examples))
    seen = {}

    def loss_fn(model, batch):
        output = SenseDistillation(senses)(model, batch)
        seen["loss"] = output.loss.dtype
        return output

    student = build_student(teacher, 1)
    linear = next(m for m in student.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: seen.update(states=out.dtype))
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, warmup_steps=0, log_every=1)
    trainer = Trainer(student, loss_fn, list(range(len(examples))),
                      TargetCollator(teacher.tokenize, examples, stored, MAX_LENGTH), config,
                      tmp_path, device="cpu", resume=False, cpu_autocast=True)
    result = trainer.train()
    assert seen == {"states": torch.bfloat16, "loss": torch.float32}
    assert np.isfinite(result.metrics["loss"]) and result.global_step == 3


def test_targets_are_the_nearest_senses_of_the_teacher_states(setup):
    paths, teacher, senses, examples = setup
    part = text_targets(teacher, senses, examples, MAX_LENGTH, batch_size=5)
    batch = teacher.tokenize(examples, MAX_LENGTH)
    expected = senses.targets(teacher.token_states(batch), batch["input_ids"], batch["embed_mask"])
    text = batch["embed_mask"].bool()
    assert part["lengths"].tolist() == text.sum(1).tolist()
    assert part["token_ids"].tolist() == batch["input_ids"][text].tolist()
    assert part["targets"].tolist() == expected[text].tolist()


def test_an_interrupted_stage_resumes_to_the_same_file(setup, tmp_path, monkeypatch):
    paths, teacher, senses, examples = setup
    cfg = TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(paths.sense_dict))
    inputs = {"sense_dict": paths.sense_dict, "texts": paths.train_json}
    whole = tmp_path / "whole.npz"
    compute_targets(teacher, senses, examples, whole, cfg, DistEnv(), inputs=inputs, flush_every=3)

    written = []
    original = PartFiles.write

    def write_then_die(self, index, arrays):
        original(self, index, arrays)
        written.append(index)
        if len(written) == 2:
            raise KeyboardInterrupt  # killed after its second part
    monkeypatch.setattr(PartFiles, "write", write_then_die)
    resumed = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        compute_targets(teacher, senses, examples, resumed, cfg, DistEnv(), inputs=inputs, flush_every=3)
    assert not resumed.exists() and written == [0, 1]
    monkeypatch.setattr(PartFiles, "write", original)
    summary = compute_targets(teacher, senses, examples, resumed, cfg, DistEnv(), inputs=inputs, flush_every=3)
    assert resumed.read_bytes() == whole.read_bytes()
    assert summary["texts"] == len(SENTENCES) and not (tmp_path / "resumed.parts").exists()


def test_a_targets_file_for_anything_else_is_refused(setup, tmp_path):
    paths, teacher, senses, examples = setup
    cfg = TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(paths.sense_dict))
    inputs = {"sense_dict": paths.sense_dict, "texts": paths.train_json}
    with pytest.raises(UserError, match="max_length 32, not 64"):
        load_targets(paths.targets, TargetsConfig.of(teacher, 64, SenseDictionary.open(paths.sense_dict)), inputs,
                     senses, len(examples))
    other = tmp_path / "other.kmeanspkl"
    save_pickle({int(t): np.ones((2, teacher.hidden_size), np.float16) for t in senses.token_ids[:5]}, other)
    with pytest.raises(UserError, match="another sense_dict"):
        load_targets(paths.targets, cfg, {**inputs, "sense_dict": other}, senses, len(examples))
    with pytest.raises(UserError, match="missing sense targets"):
        load_targets(tmp_path / "none.npz", cfg, inputs, senses, len(examples))
    # the right file, but a smaller dictionary: targets outside their tokens' senses
    small = PackedSenses({int(t): np.ones((1, teacher.hidden_size), np.float16) for t in senses.token_ids},
                         teacher.vocab_size)
    with pytest.raises(UserError, match="another dictionary"):
        load_targets(paths.targets, cfg, inputs, small, len(examples))
    # and a batch whose tokens changed since (here: another max length)
    stored = load_targets(paths.targets, cfg, inputs, senses, len(examples))
    with pytest.raises(UserError, match="tokens differ"):
        TargetCollator(teacher.tokenize, examples, stored, 8)([0, 1])


def test_a_damaged_targets_file_is_one_line(setup, tmp_path):
    """On main: zipfile.BadZipFile and a traceback in stage 5 (issue 22, 6c). Cut short or with
    bytes flipped, with the record of its bytes in the manifest (as written now) or without it."""
    import json
    import os
    import shutil

    paths, teacher, senses, examples = setup
    cfg = TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(paths.sense_dict))
    inputs = {"sense_dict": paths.sense_dict, "texts": paths.train_json}
    manifest = json.loads(open(f"{paths.targets}.manifest.json").read())
    size = paths.targets.stat().st_size
    for damage, recorded in [("cut", True), ("cut", False), ("flipped", True), ("flipped", False)]:
        copy = tmp_path / f"{damage}-{recorded}.npz"
        shutil.copy2(paths.targets, copy)
        kept = manifest if recorded else {key: value for key, value in manifest.items() if key != "outputs"}
        open(f"{copy}.manifest.json", "w").write(json.dumps(kept))
        if damage == "cut":
            os.truncate(copy, size // 2)
        else:
            with open(copy, "r+b") as fh:
                fh.seek(size // 2)
                flipped = bytes(255 - b for b in fh.read(64))
                fh.seek(size // 2)
                fh.write(flipped)
        message = "damaged targets file" if recorded else "corrupt targets file"
        with pytest.raises(UserError, match=message) as error:
            load_targets(copy, cfg, inputs, senses, len(examples))
        assert "\n" not in str(error.value)


def test_training_refuses_targets_of_another_max_length_in_one_line(setup, tmp_path):
    paths, teacher, senses, examples = setup
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "05_train.py"), "--task", "bbc-news", "--base-dir",
         str(paths.base), "--teacher", str(teacher.name), "--max-length", "24", "--max-steps", "1", "--loss", "sense"],
        capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "max_length 32, not 24" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_torchrun_ranks_equal_one(setup, tmp_path):
    paths, teacher, _, _ = setup
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}.npz"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                   "--master_port", str(free_port()), str(REPO / "scripts" / "04_targets.py"),
                   "--task", "bbc-news", "--base-dir", str(paths.base), "--teacher", str(teacher.name),
                   "--max-length", str(MAX_LENGTH), "--flush-every", "2", "--output", str(out)]
        result = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[nproc] = out
    assert outputs[1].read_bytes() == outputs[2].read_bytes()
    assert read_manifest(outputs[2])["extra"]["world_size"] == 2


def _brute_force_targets(teacher, examples, dictionary, rule) -> list[int]:
    """Each text token's target in order (-1: no entry), one token at a time."""
    batch = teacher.tokenize(examples, MAX_LENGTH)
    states = teacher.token_states(batch)
    text = batch["embed_mask"].bool() & batch["attention_mask"].bool()
    targets = []
    for b, t in text.nonzero().tolist():
        senses = dictionary.get(int(batch["input_ids"][b, t]))
        targets.append(-1 if senses is None else int(
            reference_scores(torch.tensor(senses, dtype=torch.float32), states[b, t], rule).argmax()))
    return targets


def test_each_rule_s_targets_are_the_brute_force_argmax_and_the_summary_counts_single_senses(setup, tmp_path):
    """Stage 4 on one set of senses recorded with each rule (plus a sense of 4 x the mean
    state per token, which dot prefers and l2 does not): its targets are the brute-force
    argmax under the recorded rule (none recorded: dot), and the rules disagree."""
    paths, teacher, _, examples = setup
    dictionary = {token: np.concatenate([senses, 4 * senses.mean(0, keepdims=True, dtype=np.float32)])
                  .astype(np.float16) if len(senses) > 1 else senses
                  for token, senses in load_sense_dict(paths.sense_dict).items()}
    single = [t for t, v in dictionary.items() if len(v) == 1]
    assert 0 < len(single) < len(dictionary)
    stored = {}
    for rule in (None, *SENSE_RULES):
        path = save_dictionary(dictionary, tmp_path / f"{rule}.kmeanspkl", rule)
        out = tmp_path / f"{rule}.npz"
        assert run_stage("scripts/04_targets.py", "--task", "bbc-news", "--base-dir", paths.base, "--teacher",
                         teacher.name, "--max-length", MAX_LENGTH, "--sense-dict", path, "--targets", out) == 0
        with np.load(out) as data:
            stored[rule], token_ids = data["targets"].tolist(), data["token_ids"]
        assert stored[rule] == _brute_force_targets(teacher, examples, dictionary, rule or "dot")
        manifest = read_manifest(out)
        assert manifest["config"]["sense_rule"] == (rule or "dot") == manifest["extra"]["sense_rule"]
        scored = np.asarray(stored[rule]) >= 0
        single_count = int(np.isin(token_ids[scored], single).sum())
        assert 0 < single_count < scored.sum()
        assert manifest["extra"]["single_sense_tokens"] == single_count
        assert manifest["extra"]["single_sense_share"] == round(single_count / scored.sum(), 4)
    assert stored[None] == stored["dot"]
    assert stored["dot"] != stored["l2"] and stored["dot"] != stored["cos"]


def test_targets_of_one_rule_are_not_reused_for_another(setup, tmp_path, capsys):
    """The same dictionary file (same fingerprint) recorded with another rule: stage 4 does not
    skip, and stored targets of the old rule are refused by name."""
    paths, teacher, senses, examples = setup
    dictionary, out = tmp_path / "d.kmeanspkl", tmp_path / "t.npz"
    save_dictionary(load_sense_dict(paths.sense_dict), dictionary)
    args = ["--task", "bbc-news", "--base-dir", paths.base, "--teacher", teacher.name, "--max-length", MAX_LENGTH,
            "--sense-dict", dictionary, "--targets", out]
    assert run_stage("scripts/04_targets.py", *args) == 0
    assert run_stage("scripts/04_targets.py", *args) == 0 and "up to date" in capsys.readouterr().err
    before = fingerprint(dictionary)
    write_manifest(dictionary, stage="cluster", config={"sense_rule": "l2"})  # the same file
    inputs = {"sense_dict": dictionary, "texts": paths.train_json}
    with pytest.raises(UserError, match="sense_rule 'dot', not 'l2'"):
        load_targets(out, TargetsConfig.of(teacher, MAX_LENGTH, SenseDictionary.open(dictionary)), inputs, senses,
                     len(examples))
    assert run_stage("scripts/04_targets.py", *args) == 0 and "up to date" not in capsys.readouterr().err
    assert read_manifest(out)["config"]["sense_rule"] == "l2" and fingerprint(dictionary) == before
    write_manifest(dictionary, stage="cluster", config={"sense_rule": "nearest"})
    assert run_stage("scripts/04_targets.py", *args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {dictionary}: its manifest has an unknown sense rule 'nearest': choose one of dot, l2, cos")


def _count_reads(monkeypatch, module, names: tuple[str, ...], reads: list) -> None:
    """Record (function name, path) in ``reads`` for each call of ``module``'s ``names``."""
    for name in names:
        def counted(path, *args, _name=name, _original=getattr(module, name), **kwargs):
            reads.append((_name, Path(path)))
            return _original(path, *args, **kwargs)
        monkeypatch.setattr(module, name, counted)


def test_stages_4_and_5_read_the_dictionary_and_its_manifest_once(setup, tmp_path, monkeypatch):
    """The dictionary is opened once per stage (SenseDictionary) and passed on: each check, the
    targets' config, the run's identity and the packed senses use that one manifest read."""
    import embdistill.senses.dictionary as dictionary_module

    paths, teacher, _, _ = setup
    reads: list = []
    _count_reads(monkeypatch, dictionary_module, ("read_manifest", "load_pickle"), reads)
    common = ["--task", "bbc-news", "--base-dir", paths.base, "--teacher", teacher.name, "--max-length", MAX_LENGTH,
              "--sense-dict", paths.sense_dict, "--targets", tmp_path / "targets.npz"]
    assert run_stage("scripts/04_targets.py", *common) == 0
    assert sorted(reads) == [("load_pickle", paths.sense_dict), ("read_manifest", paths.sense_dict)]
    reads.clear()
    assert run_stage("scripts/05_train.py", *common, "--run", "read-once", "--loss", "sense", "--max-steps", "1",
                     "--student-layers", "1", "--val-fraction", "0") == 0
    assert sorted(reads) == [("load_pickle", paths.sense_dict), ("read_manifest", paths.sense_dict)]


def test_the_dictionary_identity_changes_with_its_manifest_alone(tmp_path):
    path = save_dictionary({5: np.ones((2, 4), np.float16)}, tmp_path / "d.kmeanspkl")
    original = SenseDictionary.open(path).identity
    write_manifest(path, stage="cluster", config={"sense_rule": "dot", "k_rule": "sqrt"})  # the same bytes
    recorded = SenseDictionary.open(path).identity
    assert recorded["sha256"] == original["sha256"] and recorded != original


def test_the_tokenizer_is_known_by_its_content_not_its_folder(tiny_bert_dir, tiny_llama_dir, tmp_path):
    """The same model folder copied elsewhere (another virtual environment's copy of an
    installed teacher) gives targets of the same identity; another tokenizer does not."""
    import shutil

    from embdistill.senses.targets import tokenizer_identity

    copy = shutil.copytree(tiny_bert_dir, tmp_path / "elsewhere")
    here, there = (load_teacher(str(folder), device="cpu").tokenizer for folder in (tiny_bert_dir, copy))
    assert here.name_or_path != there.name_or_path
    assert tokenizer_identity(here) == tokenizer_identity(there)
    assert tokenizer_identity(load_teacher(str(tiny_llama_dir), device="cpu").tokenizer) != tokenizer_identity(here)
