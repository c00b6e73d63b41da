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
:attr:`~embdistill.senses.dictionary.SenseDictionary.identity`). The revision folder is a hash of the model's
spec; the dataset revision inside a local task's result file is a hash of its eval.json.
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
from .specs import ModelSpec, open_dictionaries, parse_model_specs
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


def evaluate(config: EvaluationConfig, base: Path, *, device, overwrite: bool = False,
             dictionaries: dict | None = None) -> dict:
    """Run the evaluation (or reuse a finished one) and return the table. ``dictionaries``: the
    replace-mode dictionaries the caller opened (:func:`.specs.open_dictionaries`), else opened here."""
    out_dir = results_dir(base, config.run)
    table_path = out_dir / "table.json"
    tasks = [resolve_evaluation_task(arg, config.text_column, config.label_column) for arg in config.tasks]
    selected = select_task_types(tasks, config.task_types)
    task_slugs = [task.slug for task in tasks]
    specs = parse_model_specs(config.models, task_slugs)
    dictionaries = open_dictionaries(specs, task_slugs) if dictionaries is None else dictionaries
    inputs = {key: path for task in tasks for key, path in task_inputs(task, base).items()}
    for spec in specs:
        inputs.update(spec.local_inputs(task_slugs))
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
                           dictionaries=dictionaries)
    throughput = {"task": eval_tasks[0].name, "texts": len(eval_tasks[0].texts(config.throughput_texts)),
                  "batch_size": config.batch_size, "device": str(device), "cpu_threads": torch.get_num_threads()}
    table = build_table(config.run, rows, {t.name: protocol(t.mteb_task) for t in eval_tasks}, out_dir, throughput)
    files = write_table(table, out_dir)
    write_manifest(table_path, stage="evaluate", config=manifest_config, inputs=inputs,
                   extra={"files": {k: v.name for k, v in files.items()}})
    return table


def evaluate_models(specs: list[ModelSpec], tasks: list[EvaluationTask], cache_dir: Path, *,
                    device, config: EvaluationConfig, dictionaries: dict) -> list[ModelRow]:
    """Each model on each task, loading one model at a time; a model that later specs use
    again (plain and replace mode, an untrained student of it) stays loaded until then. A
    per-task spec (``{task}``) loads its model for each task; its throughput and parameter
    count are those of the first task's model."""
    import mteb
    from sklearn.exceptions import ConvergenceWarning

    # mteb's protocol fixes LogisticRegression(max_iter=100), whose lbfgs often stops at that
    # limit: that is the published protocol, and a warning per fit would bury the log.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    cache = mteb.ResultCache(cache_path=cache_dir)
    instructions = {t.name: t.instruction for t in tasks}
    throughput_texts = tasks[0].texts(config.throughput_texts)
    loaded: dict = {}
    rows = []
    for i, spec in enumerate(specs):
        result_files, encoder = {}, None
        for task in tasks:
            resolved = spec.for_task(task.task.slug)
            if encoder is None or resolved is not spec:
                still_needed = {s.for_task(t.task.slug).target for s in specs[i:] if s.kind != "st"
                                for t in tasks}
                for target in [t for t in loaded if t not in still_needed]:
                    del loaded[target]
                _release_memory()
                encoder = load_encoder(resolved, instructions, device=device,
                                       batch_size=config.batch_size, max_length=config.max_length,
                                       loaded=loaded, allow_max_length_mismatch=config.allow_max_length_mismatch,
                                       dictionary=dictionaries.get(resolved.sense_dict))
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
                             texts_per_second=texts_per_second, tokens=tokens, result_files=result_files))
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
