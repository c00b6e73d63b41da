"""The plan before the run (embdistill/plan.py, scripts/09_plan.py): fitted on small N, it
predicts a larger N; the command prints every stage and refuses bad options in one line."""

import json

import numpy as np
import pytest
from helpers import run_stage

from embdistill import plan
from embdistill.plan import METRICS, STAGES, TEACHERS, Options, Work

SETTINGS = {"task": "synthetic", "threads": 1, "max_length": 128, "cap": 50, "senses": 5, "train_steps": 20}


# every term costs 1e-6 a unit (synthetic_record): the rates measured on their own, as bench_scale's
UNIT_RATES = {stage: {"term": term, "rate": 1e-6} for stage, term in plan.UNIT_RATE_TERMS.items()}


def synthetic_record(texts: int, rng, exponent: float = 1.1) -> dict:
    """A bench_scale record whose token counts are drawn (Poisson) from a Zipf law and whose
    costs follow known rates plus 3 % noise: what the bench measures, without running it."""
    minilm = TEACHERS["minilm"]
    tokens_per_text = 30
    counts = rng.poisson(plan.zipf_counts(texts * tokens_per_text, minilm.vocab, exponent))
    counts = counts[counts > 0]
    work = {"texts": texts, "chars": texts * 150, "eval_texts": texts // 4, "tokens": int(counts.sum()),
            "token_ids": len(counts), "kept_states": int(np.minimum(counts, SETTINGS["cap"]).sum()),
            "dictionary_states": int(np.minimum(counts, SETTINGS["senses"]).sum())}
    _, derived, options = plan.record_inputs({"work": work}, SETTINGS)
    measured = Work(texts, work["tokens"], work["chars"], work["eval_texts"])
    x = plan.drivers(measured, derived, minilm, options)
    model = plan.model_terms(minilm, options, measured, derived)
    stages = {stage: {metric: (5.0 + 1e-6 * sum(x[stage][metric].values()) + model[stage][metric]) * rng.uniform(0.97, 1.03)
                      for metric in METRICS} for stage in STAGES}
    return {"n": texts, "work": work, "stages": stages}


def test_constants_fitted_on_two_sizes_predict_a_larger_one_within_a_quarter():
    rng = np.random.default_rng(0)
    small = [synthetic_record(n, rng) for n in (1000, 2000)]
    large = synthetic_record(4000, rng)
    constants = plan.fit_constants(small, SETTINGS, "today", "here", UNIT_RATES)
    exponent, offset, share = constants["zipf_law"]  # drawn from a pure Zipf law over the vocabulary
    assert abs(exponent - 1.1) <= 0.1 and offset <= 2 and share >= 0.9, constants["zipf_law"]
    checked = plan.validate(constants, large)
    errors = {(stage, m): row[m]["error"] for stage, row in checked.items() for m in METRICS}
    assert max(map(abs, errors.values())) < 0.25, errors
    # the kept states (gather, combine) grow less than the texts (4x), as the cap binds
    assert large["work"]["kept_states"] < 3.5 * small[0]["work"]["kept_states"]


def test_a_term_measured_on_its_own_is_subtracted_and_the_other_fitted():
    # the combine's time: a per-token term and a per-byte term that grow together with N
    xs = [{"token_ids": t, "state_bytes": b} for t, b in [(10, 100), (20, 300), (40, 700)]]
    ys = [2 + 3 * x["token_ids"] + 5 * x["state_bytes"] for x in xs]
    fitted = plan.fit_terms(xs, ys, {"state_bytes": 5.0})
    assert fitted["a"] == pytest.approx(2) and fitted["rates"] == pytest.approx({"token_ids": 3, "state_bytes": 5})
    with pytest.raises(ValueError, match="at most one can be fitted"):
        plan.fit_terms(xs, ys, {})


def test_a_fit_needs_every_rate_that_is_measured_on_its_own():
    rng = np.random.default_rng(2)
    records = [synthetic_record(n, rng) for n in (500, 1000)]
    with pytest.raises(ValueError, match="the plan needs"):
        plan.fit_constants(records, SETTINGS, "today", "here", {k: v for k, v in UNIT_RATES.items() if k != "combine"})


def test_kept_states_stop_growing_once_every_id_reaches_the_cap():
    llama = TEACHERS["llm2vec-llama3-8b"]
    options = Options(per_token=1000, cap=4000)
    sizes = [plan.derive(Work(n, n * 500.0, n * 2000.0, 0), llama, options, (1.0, 0.0, 1.0)).kept_states for n in (10**3, 10**5, 10**8)]
    assert sizes[0] < sizes[1] < sizes[2] <= llama.vocab * 1000 * 1.0001
    assert sizes[2] > 0.99 * llama.vocab * 1000


@pytest.fixture
def constants_file(tmp_path):
    rng = np.random.default_rng(1)
    constants = plan.fit_constants([synthetic_record(n, rng) for n in (500, 1000)], SETTINGS, "2026-12-07", "test",
                                   UNIT_RATES)
    path = tmp_path / "constants.json"
    path.write_text(json.dumps(constants))
    return str(path)


def test_the_paper_plan_prints_every_stage_and_says_where_gpu_times_come_from(constants_file, capsys):
    args = ["--teacher", "llm2vec-llama3-8b", "--tasks", "all", "--device", "h100", "--gather-gpus", "6",
            "--train-gpus", "9", "--constants", constants_file]
    assert run_stage("scripts/09_plan.py", *args) == 0
    out = capsys.readouterr().out
    for stage in STAGES[:-1]:
        assert f"| {stage} |" in out
    assert "measured once, random weights, from H100_FIGURES" in out
    assert f"{sum(row[1] for row in plan.TASK_SIZES.values()):,} texts" in out  # the 16 tasks' train splits
    # six gather GPUs take a sixth of one GPU's time
    constants = plan.load_constants(constants_file)
    work = plan.task_work(range(1, 17), 512)
    llama = TEACHERS["llm2vec-llama3-8b"]
    seconds = [plan.plan(work, llama, Options(device="h100", gather_gpus=gpus), constants)["gather"]["seconds"]
               for gpus in (1, 6)]
    assert seconds[0] == pytest.approx(6 * seconds[1])


@pytest.mark.parametrize("args, message", [
    (["--tasks", "17"], "unknown task '17'"),
    (["--texts", "1000"], "--texts needs --mean-tokens"),
    (["--texts", "1000", "--mean-tokens", "20", "--tasks", "3"], "either --tasks or --texts"),
    (["--texts", "1000", "--mean-tokens", "20", "--hidden-size", "64"], "missing --layers, --vocab-size, --params"),
    (["--texts", "1000", "--mean-tokens", "20", "--train-gpus", "0"], "--train-gpus"),
    (["--texts", "1000", "--mean-tokens", "20", "--student-layers", "7"], "more than the teacher's 6 layers"),
    (["--texts", "1000", "--mean-tokens", "20", "--constants", "/nonexistent.json"], "cannot read it"),
])
def test_bad_options_are_one_line_and_status_2(args, message, capsys):
    assert run_stage("scripts/09_plan.py", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_constants_of_an_older_fit_are_refused_in_one_line(constants_file, tmp_path, capsys):
    older = json.loads(open(constants_file).read())
    older["zipf_law"] = older["zipf_law"][::2]  # (exponent, share): before the offset was fitted
    path = tmp_path / "older.json"
    path.write_text(json.dumps(older))
    assert run_stage("scripts/09_plan.py", "--texts", "1000", "--mean-tokens", "20", "--constants", str(path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --constants") and "refit them" in err and "\n" not in err, err
