"""One evaluation run: every model on every task (of the selected task types) through
``mteb.evaluate``, then the table.

Layout under ``results/<run>/`` (:func:`embdistill.paths.results_dir`)::

    mteb/results/embdistill__<label>/<revision>/<Task>.json   mteb's own result files
    mteb/results/embdistill__<label>/<revision>/model_meta.json
    table.json (+ .manifest.json), table.md, scores.png

Tasks load first (a missing eval.json or an unreachable hub fails before any model loads);
then one model at a time: load, measure throughput, evaluate on each task, release (unless
a later spec uses the same model). mteb re-runs every (model, task) pair of a run
(``overwrite_strategy="always"``): whether the run as a whole is done is decided by the
table's manifest, which records the specs, the protocol and fingerprints of the local inputs
(eval.json files, lee-sts's files, model folders) and the dictionaries' identities (their content and their
manifests: the sense rule, k rule, teacher and max length they were made with,
:attr:`~embdistill.senses.dictionary.SenseDictionary.identity`), and which task's models a task
without its own uses (``student_of``). The revision folder is a hash of the model's spec; the
dataset revision inside a local task's result file is a hash of its eval.json.
"""

from __future__ import annotations

import gc
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifacts import is_done, load_json, write_manifest
from ..distributed import print0
from ..errors import UserError
from ..paths import Paths, results_dir
from .local_tasks import (EvaluationTask, load_evaluation_task, protocol, resolve_evaluation_task,
                          select_task_types, task_inputs)
from .models import load_encoder, measure_throughput
from .specs import ModelSpec, model_task_slugs, open_dictionaries, parse_model_specs, parse_student_of
from .table import ModelRow, build_table, format_markdown, write_table

log = logging.getLogger("embdistill.evaluation")


@dataclass(frozen=True)
class EvaluationConfig:
    run: str
    tasks: tuple[str, ...]  # task arguments (index, name or file)
    models: tuple[str, ...]  # model specs
    task_types: tuple[str, ...] | None = None  # mteb task types; None: see local_tasks' docstring
    samples_per_label: int | None = None  # None: 32 for local tasks, mteb's own for hub tasks
    n_experiments: int | None = None  # None: mteb's default (10)
    batch_size: int = 32
    max_length: int = 512
    allow_max_length_mismatch: bool = False  # replace mode with a dictionary of another max length
    throughput_texts: int = 256
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"
    student_of: tuple[str, ...] = ()  # TASK=SOURCE: per-task specs score TASK with SOURCE's models


def evaluate(config: EvaluationConfig, base: Path, *, device, overwrite: bool = False,
             dictionaries: dict | None = None) -> dict:
    """Run the evaluation (or reuse a finished one) and return the table. ``dictionaries``: the
    replace-mode dictionaries the caller opened (:func:`.specs.open_dictionaries`), else opened here."""
    out_dir = results_dir(base, config.run)
    table_path = out_dir / "table.json"
    tasks = [resolve_evaluation_task(arg, config.text_column, config.label_column) for arg in config.tasks]
    selected = select_task_types(tasks, config.task_types)
    student_of = parse_student_of(config.student_of, tasks)
    model_slugs = model_task_slugs(tasks, student_of)
    specs = parse_model_specs(config.models, model_slugs)
    dictionaries = open_dictionaries(specs, model_slugs) if dictionaries is None else dictionaries
    inputs = {key: path for task in tasks for key, path in task_inputs(task, base).items()}
    for spec in specs:
        inputs.update(spec.local_inputs(model_slugs))
    manifest_config = {**vars(config), "models": [spec.text for spec in specs],
                       "sense_dicts": {key: dictionaries[path].identity for key, path in inputs.items()
                                       if key.endswith(".sense_dict")}}
    if not overwrite and is_done(table_path, config=manifest_config, inputs=inputs):
        log.info("evaluation: %s is up to date, skipping (--overwrite to redo)", table_path)
        return load_json(table_path)

    eval_tasks = [
        load_evaluation_task(task, task_type, Paths(base, task.slug), samples_per_label=config.samples_per_label,
                             n_experiments=config.n_experiments, seed=config.seed)
        for task, task_type in selected
    ]
    names = [t.name for t in eval_tasks]
    for name in names:
        if names.count(name) > 1:
            raise UserError(f"task {name} is given twice (or a file is named like a task's variant)")
    rows = evaluate_models(specs, eval_tasks, out_dir / "mteb", device=device, config=config,
                           dictionaries=dictionaries, student_of=student_of)
    throughput = {"task": eval_tasks[0].name, "texts": len(eval_tasks[0].texts(config.throughput_texts)),
                  "batch_size": config.batch_size, "device": str(device), "cpu_threads": torch.get_num_threads()}
    table = build_table(config.run, rows, {t.name: protocol(t.mteb_task) for t in eval_tasks}, out_dir, throughput,
                        student_of={t.name: student_of[t.task.slug] for t in eval_tasks if t.task.slug in student_of})
    files = write_table(table, out_dir)
    write_manifest(table_path, stage="evaluate", config=manifest_config, inputs=inputs,
                   extra={"files": {k: v.name for k, v in files.items()}})
    return table


def evaluate_models(specs: list[ModelSpec], tasks: list[EvaluationTask], cache_dir: Path, *,
                    device, config: EvaluationConfig, dictionaries: dict,
                    student_of: dict[str, str] | None = None) -> list[ModelRow]:
    """Each model on each task, loading one model at a time; a model that later specs use
    again (plain and replace mode, an untrained student of it) stays loaded until then. A
    per-task spec (``{task}``, filled with the task's folder or the one ``student_of`` names)
    loads each of its models once and scores with it every task it serves, in a row, so that
    its embedding cache serves them all; its throughput and parameter count are those of the
    first task's model."""
    import mteb
    from sklearn.exceptions import ConvergenceWarning

    # mteb's protocol fixes LogisticRegression(max_iter=100), whose lbfgs often stops at that
    # limit: that is the published protocol, and a warning per fit would bury the log.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    cache = mteb.ResultCache(cache_path=cache_dir)
    instructions = {t.name: t.instruction for t in tasks}
    throughput_texts = tasks[0].texts(config.throughput_texts)
    student_of = student_of or {}
    model_slug = {t.name: student_of.get(t.task.slug, t.task.slug) for t in tasks}
    loaded: dict = {}
    rows = []
    for i, spec in enumerate(specs):
        result_files, encoder, encoder_spec = {}, None, None
        resolved_for = {t.name: spec.for_task(model_slug[t.name]) for t in tasks}
        first_use = list(dict.fromkeys(resolved_for.values()))
        for task in sorted(tasks, key=lambda t: first_use.index(resolved_for[t.name])):  # stable
            resolved = resolved_for[task.name]
            if resolved != encoder_spec:
                still_needed = {s.for_task(slug).target for s in specs[i:] if s.kind != "st"
                                for slug in model_slug.values()}
                for target in [t for t in loaded if t not in still_needed]:
                    del loaded[target]
                _release_memory()
                encoder = load_encoder(resolved, instructions, device=device,
                                       batch_size=config.batch_size, max_length=config.max_length,
                                       loaded=loaded, allow_max_length_mismatch=config.allow_max_length_mismatch,
                                       dictionary=dictionaries.get(resolved.sense_dict),
                                       prompt_tasks=model_slug)
                encoder_spec = resolved
            if not result_files:  # the first task's model stands for the row
                texts_per_second = measure_throughput(encoder, throughput_texts, tasks[0].name)
                n_parameters, dictionary_values, tokens = encoder.n_parameters, encoder.dictionary_values, encoder.tokens
                log.info("model %s: %.1f texts/s on %d texts of %s", spec.label,
                         texts_per_second, len(throughput_texts), tasks[0].name)
            task.reset_random_state()
            result = mteb.evaluate(encoder, task.mteb_task, cache=cache, overwrite_strategy="always",
                                   encode_kwargs={"batch_size": config.batch_size},
                                   co2_tracker=False, show_progress_bar=False)
            path = cache.get_task_result_path(task.name, encoder.mteb_model_meta)
            result_files[task.name] = path
            log.info("model %s, task %s: %s %.4f (%s)", spec.label, task.name,
                     task.mteb_task.metadata.main_score, result.task_results[0].main_score, path)
        rows.append(ModelRow(label=spec.label, kind=spec.kind, spec=spec.text,
                             n_parameters=n_parameters, dictionary_values=dictionary_values,
                             texts_per_second=texts_per_second, tokens=tokens,
                             result_files={t.name: result_files[t.name] for t in tasks},
                             untrained=spec.kind == "untrained" or bool(spec.kind == "replace" and spec.n_layers)))
        del encoder
    loaded.clear()
    _release_memory()
    return rows


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(table: dict, out_dir: Path) -> None:
    print0(format_markdown(table), end="")
    print0(f"results: {out_dir} (table.md, table.json, scores.png, mteb/)")
