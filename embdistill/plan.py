"""The plan before the run: each stage's disk, peak host memory, device memory and time, from
unit costs we measured (``scripts/09_plan.py`` prints it).

**The work.** ``texts`` training texts of ``mean_tokens`` text tokens each (cut to the max
length), so ``tokens = texts x mean_tokens``. Which token ids occur how often follows a
Zipf-Mandelbrot law over the teacher's vocabulary ``V``: the id of rank ``r`` occurs ``c_r =
tokens x (r + q)^-s / sum (r + q)^-s`` times, over the share ``u`` of the vocabulary that occurs at
all (``s``, ``q`` and ``u`` fitted on our token counts, :func:`fit_zipf`; the same share and offset
assumed for another vocabulary). The offset ``q`` flattens the head: tweets' most frequent ids are
more alike in frequency than Zipf's law has them, and a pure law (``q = 0``) fitted on 1k-4k tweets
saw 34 % fewer distinct ids at 16k than there were (BENCHMARKS.md). From it:

* kept states ``S = sum_r min(c_r, per_token)`` (gather's rule: every occurrence of an id seen at
  most ``per_token`` times, about ``per_token`` of the others; combine's ``--cap`` on top);
* dictionary rows ``D = sum_r min(c_r, k)`` (``k`` senses per id; an id with fewer states keeps
  them raw); ``k`` is ``--senses`` for the fixed rule, for ``mcl`` at most ``0.4 x per_token``
  (the original's rule, an upper bound: MiniLM's states give 5);
* distinct ids ``sum_r 1 - exp(-c_r)``.

**Formulas** (``b``: bytes of a state, 2 for fp16; ``H`` hidden size; ``P`` teacher parameters;
``Ps`` the student's: embeddings plus its share of the layers; ``R`` ranks of the stage):

* every quantity of a stage is ``a + sum(rate x) + model`` over the stage's work terms ``x``
  below (:func:`drivers`); ``a`` and the rates are fitted on our CPU (bench/bench_scale.py,
  MiniLM; ``fit_constants``), but for the CPU rates of :data:`UNIT_RATE_TERMS`, measured on their
  own (bench_scale.py's ``measure_unit_rates``); ``model`` is what a stage holds whatever the
  work's size, stated, not fitted (MiniLM's is subtracted before the fit, so that another
  teacher's replaces it);
* time ``x``: texts: characters; count: tokens (both measured on one large batch: CPU work,
  tokenising and JSON, on no GPU); gather, targets, teacher embeddings: tokens x P (forward
  FLOPs / 2) / R; combine: distinct ids (its per-token Python work, which dominates at bench
  sizes: 4.4k to 13.7k ids took 1.7 to 2.7 s) plus S x H x b (reading, checking, writing and
  hashing the states' bytes: measured on a synthetic rank file of 384-d rows, so the per-row work
  is in it too, which overstates a wider teacher's: a bound); cluster: S x H x k x max_iter /
  R; train: steps x batch x mean_tokens x Ps; evaluate: eval texts x mean_tokens x Ps;
* host memory ``x``: texts: characters; count: distinct ids (train.json is read lazily); gather:
  none fitted, its growth is stated below (``a`` alone is fitted: the heap handed back after
  every part, its peak no longer grows with the batches, and a slope fitted on 1k-4k was noise);
  combine: S (a place and an occurrence id per row, and per-token records; the rows pass in
  blocks of 4 MiB: 2M synthetic rows of 20k tokens took 132 MB, 66 bytes a row); cluster: none
  fitted (its share of the row file, mapped, S x H x b / R, is stated below: a slope fitted on
  1k-4k, where the file is 21-67 MB beside 400 MB of start-up, was noise and missed 16k by
  -28 %); targets, train: D x H;
  evaluate: eval texts; teacher embeddings: characters (the corpus is held whole; embeddings go
  to disk shard by shard);
* disk ``x``: texts: characters; count: distinct ids; gather: S x H x b; combine: S x H x b
  (combined.pkl and the row file); cluster: D x H; targets: tokens; train: D x H; evaluate:
  eval texts; teacher embeddings: texts x H x teachers;
* ``model`` (host): the teacher's weights in fp32 on a CPU, one bf16 copy passing through the
  host on a GPU (P x 4 or P x 2 bytes); the gather's part: ``flush_every`` texts' rows, every
  text token at most, twice (its blocks and the array they make: 2 x flush_every x mean_tokens
  x H x b), and the merge's 32 bytes of ids a kept row of the rank (S / R x 32); a clustering
  process's share of the mapped row file (S x H x b / R); the student's
  in training: Ps x 16 bytes (weights, grads, two AdamW moments) on its device, Ps x 4 x 5 bytes
  on disk (a checkpoint with the moments and two exports);
* device memory (GPU only): teacher weights P x 2 + activations batch x length x H x 2 x 16
  (inference, a rough factor) + the dictionary D x H x 2 where the stage scores senses;
  training Ps x 16 + D x H x 4 + batch x length x H x layers x 34 bytes (activations kept for
  the backward pass, bf16 autocast); clustering 3 x 4 x batch_elements bytes.

**Times on a GPU** come from ``/work/shared/H100_FIGURES.md`` (measured once, random weights,
Llama-3-8B shape, one H100) until bench/gpu_check.sh has measured ours: a teacher forward at
34,300 tokens/s for 7.5e9 parameters, scaled by P; a training step of the student as 3 forwards;
MCL's count rule 2.8 ms for a token of 1,000 states, 87 ms for 4,000 (``n^2.48`` between and
beyond). Stages with no GPU figure (texts, count, combine, k-means) keep the CPU rate, said so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

STAGES = ("texts", "count", "gather", "combine", "cluster", "targets", "train", "evaluate", "teacher_embeddings")
METRICS = ("cpu_s", "peak_rss_mb", "disk_mb")  # the time fitted: CPU seconds at 1 thread (an idle wall time)
CONSTANTS_FILE = Path(__file__).resolve().parents[1] / "bench" / "plan_constants.json"
MB = 2**20
CHARS_PER_TOKEN = 4.2  # English text, subword tokenizers (an assumption where only characters are known)
GPU_SOURCE = "measured once, random weights, from H100_FIGURES"
H100_FORWARD_TOKENS_S = 34_300  # gather kept on the GPU, Llama-3-8B shape (H100_FIGURES.md)
H100_FORWARD_PARAMS = 7.5e9  # that shape without the LM head
MCL_H100_S = (1_000, 2.8e-3, 4_000, 87e-3)  # (n, seconds, n, seconds) per token (H100_FIGURES.md)


@dataclass(frozen=True)
class Teacher:
    name: str
    hidden: int
    layers: int
    vocab: int
    params: float
    student_layers: int

    @property
    def student_params(self) -> float:
        embeddings = self.vocab * self.hidden
        return embeddings + (self.params - embeddings) * self.student_layers / self.layers


TEACHERS = {
    # all-MiniLM-L6-v2 (its config.json); the student keeps 2 layers
    "minilm": Teacher("minilm", 384, 6, 30_522, 22.7e6, 2),
    # Llama-3-8B without its LM head (4096 x 14336 MLP, 8 KV heads); the student keeps 4 layers
    "llm2vec-llama3-8b": Teacher("llm2vec-llama3-8b", 4096, 32, 128_256, 7.5e9, 4),
}

# The original's 16 tasks: (MTEB name, train texts, mean characters of a train text, test texts),
# from mteb 2.26's descriptive_stats/Classification/<name>.json (num_samples and
# average_text_length of the train split and of the evaluation split; FinancialPhrasebank has
# only a train split, which the pipeline splits by seed).
TASK_SIZES = {
    1: ("ArxivClassification", 28388, 56458, 2500),
    2: ("Banking77Classification", 10003, 59, 3080),
    3: ("DBpediaClassification", 2048, 282, 2048),
    4: ("EmotionClassification", 16000, 97, 2000),
    5: ("FinancialPhrasebankClassification", 2264, 122, 2264),
    6: ("FrenkEnClassification", 8404, 145, 2301),
    7: ("ImdbClassification", 25000, 1325, 25000),
    8: ("CanadaTaxCourtOutcomesLegalBenchClassification", 6, 476, 244),
    9: ("NewsClassification", 120000, 236, 7600),
    10: ("PatentClassification", 25000, 18620, 2048),
    11: ("PoemSentimentClassification", 892, 38, 104),
    12: ("ToxicChatClassification", 2801, 203, 1164),
    13: ("ToxicConversationsClassification", 50000, 299, 2048),
    14: ("TweetSentimentExtractionClassification", 27481, 68, 3534),
    15: ("TweetTopicSingleClassification", 1516, 166, 1693),
    16: ("YelpReviewFullClassification", 650000, 732, 2048),
}


@dataclass(frozen=True)
class Work:
    """What the stages process: texts, their characters and tokens, the held-out texts."""

    texts: int
    tokens: float
    chars: float
    eval_texts: int

    @property
    def mean_tokens(self) -> float:
        return self.tokens / max(self.texts, 1)


def task_work(indices, max_length: int) -> Work:
    """The tasks' training texts, each cut to ``max_length`` tokens (characters / CHARS_PER_TOKEN)."""
    rows = [TASK_SIZES[i] for i in indices]
    return Work(texts=sum(r[1] for r in rows), tokens=sum(r[1] * min(r[2] / CHARS_PER_TOKEN, max_length) for r in rows),
                chars=sum(r[1] * r[2] for r in rows), eval_texts=sum(r[3] for r in rows))


@dataclass(frozen=True)
class Options:
    """The options of the real stages that change the cost, and the launch."""

    max_length: int = 512
    per_token: int = 1000  # 02_gather.py --per-token
    cap: int = 4000  # a0_generate_combinepkl.py --cap
    k_rule: str = "fixed"
    senses: int = 5
    max_iter: int = 20
    batch_elements: int = 1 << 26
    gather_batch: int = 16
    flush_every: int = 256  # 02_gather.py --flush-every: texts of a part
    train_batch: int = 3
    train_steps: int = 0  # 0: epochs x texts / (batch x train GPUs)
    epochs: int = 5
    gather_gpus: int = 1
    train_gpus: int = 1
    cluster_procs: int = 1
    device: str = "cpu"
    teachers: int = 1  # multi-teacher: teachers of this shape

    @property
    def k(self) -> int:
        return self.senses if self.k_rule == "fixed" else max(5, int(0.4 * min(self.per_token, self.cap)))

    def steps(self, work: Work) -> int:
        return self.train_steps or math.ceil(self.epochs * work.texts / (self.train_batch * self.train_gpus))


def zipf_counts(tokens: float, vocab: int, exponent: float, offset: float = 0.0) -> np.ndarray:
    """Expected occurrences of each token id, by rank: ``tokens x (r + offset)^-exponent``, normalised."""
    weights = (np.arange(1, vocab + 1, dtype=np.float64) + offset) ** -exponent
    return tokens * weights / weights.sum()


def law_counts(tokens: float, vocab: int, law: tuple[float, float, float]) -> np.ndarray:
    """The expected counts of a law ``(exponent, offset, share of the vocabulary in use)``."""
    exponent, offset, share = law
    return zipf_counts(tokens, max(int(vocab * share), 1), exponent, offset)


@dataclass(frozen=True)
class Derived:
    kept_states: float
    dictionary_states: float
    token_ids: float


def derive(work: Work, teacher: Teacher, options: Options, law: tuple[float, float, float]) -> Derived:
    """The kept states, dictionary rows and distinct ids of the ``law`` (:func:`law_counts`)."""
    return Derived(*count_quantities(law_counts(work.tokens, teacher.vocab, law), min(options.per_token, options.cap), options.k))


def count_quantities(counts: np.ndarray, cap: int, senses: int) -> tuple[float, float, float]:
    """The kept states, dictionary rows and distinct ids of expected ``counts`` per id."""
    return (float(np.minimum(counts, cap).sum()), float(np.minimum(counts, senses).sum()),
            float((1 - np.exp(-counts)).sum()))


LAW_KEYS = ("kept_states", "dictionary_states", "token_ids")


def fit_zipf(records: list[dict], vocab: int, cap: int, senses: int) -> tuple[float, float, float]:
    """The law (exponent, offset, share of the vocabulary in use) whose kept states, dictionary
    rows and distinct ids best match the counts (squared log error over the records): a coarse
    grid, then a finer one around its best."""
    measured = [(r["work"]["tokens"], [r["work"][key] for key in LAW_KEYS]) for r in records]

    def error(law) -> float:
        shares = law_counts(1.0, vocab, law)  # each id's share of the tokens, once per law
        total = 0.0
        for tokens, observed in measured:
            predicted = count_quantities(tokens * shares, cap, senses)
            total += sum(math.log(p / o) ** 2 for p, o in zip(predicted, observed))
        return total

    grid = [(s, q, u) for s in np.arange(0.8, 2.01, 0.05) for q in (0, 2, 5, 10, 20, 50) for u in np.arange(0.1, 1.01, 0.1)]
    s0, q0, u0 = min(grid, key=error)
    offsets = sorted({q0 * f for f in (0.5, 0.7, 0.85, 1, 1.2, 1.4, 2)} if q0 else {0, 0.5, 1, 1.5})
    fine = [(s, q, u) for s in np.arange(s0 - 0.05, s0 + 0.051, 0.01) for q in offsets
            for u in np.arange(max(u0 - 0.08, 0.02), min(u0 + 0.08, 1.0) + 1e-9, 0.02)]
    return tuple(round(float(v), 3) for v in min(fine, key=error))


def drivers(work: Work, derived: Derived, teacher: Teacher, options: Options) -> dict[str, dict[str, dict[str, float]]]:
    """Each stage's work per metric as named terms ``{term: x}`` (the module docstring's list):
    the metric is ``a + sum(rate x)`` over them."""
    H, P, Ps, b = teacher.hidden, teacher.params, teacher.student_params, 2
    S, D, T, R = derived.kept_states, derived.dictionary_states, derived.token_ids, options.gather_gpus
    eval_tokens = work.eval_texts * work.mean_tokens
    return {
        "texts": {"cpu_s": {"chars": work.chars}, "peak_rss_mb": {"chars": work.chars}, "disk_mb": {"chars": work.chars}},
        "count": {"cpu_s": {"tokens": work.tokens}, "peak_rss_mb": {"token_ids": T}, "disk_mb": {"token_ids": T}},
        "gather": {"cpu_s": {"forward": work.tokens * P / R}, "peak_rss_mb": {},
                   "disk_mb": {"state_bytes": S * H * b}},
        "combine": {"cpu_s": {"token_ids": T, "state_bytes": S * H * b}, "peak_rss_mb": {"rows": S},
                    "disk_mb": {"state_bytes": S * H * b}},
        "cluster": {"cpu_s": {"kmeans": S * H * options.k * options.max_iter / options.cluster_procs},
                    "peak_rss_mb": {}, "disk_mb": {"dictionary": D * H}},
        "targets": {"cpu_s": {"forward": work.tokens * P / R}, "peak_rss_mb": {"dictionary": D * H},
                    "disk_mb": {"tokens": work.tokens}},
        "train": {"cpu_s": {"student_tokens": options.steps(work) * options.train_batch * work.mean_tokens * Ps},
                  "peak_rss_mb": {"dictionary": D * H}, "disk_mb": {"dictionary": D * H}},
        "evaluate": {"cpu_s": {"student_tokens": eval_tokens * Ps}, "peak_rss_mb": {"eval_texts": work.eval_texts},
                     "disk_mb": {"eval_texts": work.eval_texts}},
        "teacher_embeddings": {"cpu_s": {"forward": work.tokens * P * options.teachers / R},
                               "peak_rss_mb": {"chars": work.chars},
                               "disk_mb": {"embeddings": work.texts * H * options.teachers}},
    }


def model_terms(teacher: Teacher, options: Options, work: Work, derived: Derived) -> dict[str, dict[str, float]]:
    """What a stage holds by its design (MB), stated, not fitted: weights, the gather's part of
    texts and its merge's ids, the clustering's mapped rows."""
    host_bytes = 4 if options.device == "cpu" else 2
    teacher_mb = teacher.params * host_bytes / MB
    student = teacher.student_params
    terms = {stage: dict.fromkeys(METRICS, 0.0) for stage in STAGES}
    for stage in ("gather", "targets", "teacher_embeddings"):
        terms[stage]["peak_rss_mb"] = teacher_mb
    # a part's kept rows (at most every text token), twice: its blocks and the array they make;
    # then the merge's 32 bytes of ids a kept row of the rank (merge_parts)
    part_rows = options.flush_every * min(work.mean_tokens, options.max_length)
    terms["gather"]["peak_rss_mb"] += (2 * part_rows * teacher.hidden * 2 + 32 * derived.kept_states / options.gather_gpus) / MB
    # a clustering process's share of the row file, mapped: each page read once, resident
    terms["cluster"]["peak_rss_mb"] = derived.kept_states * teacher.hidden * 2 / options.cluster_procs / MB
    terms["train"]["peak_rss_mb"] = student * (16 if options.device == "cpu" else 4) / MB
    terms["train"]["disk_mb"] = student * 4 * 5 / MB
    terms["evaluate"]["peak_rss_mb"] = student * 4 / MB
    return terms


def _fit_line(xs, ys) -> dict[str, float]:
    """y = a + rate x by least squares; x that does not vary (the training's fixed steps):
    y = rate x; a negative rate (noise on a flat line): the mean."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if np.ptp(xs) <= 0.1 * xs.mean():
        return {"a": 0.0, "rate": float(np.mean(ys / xs))}
    rate, a = np.polyfit(xs, ys, 1)
    return {"a": float(a), "rate": float(rate)} if rate > 0 else {"a": float(ys.mean()), "rate": 0.0}


def fit_terms(xs: list[dict[str, float]], ys: list[float], known: dict[str, float]) -> dict:
    """``a`` and each term's rate of one stage's metric: the terms with a rate in ``known``
    (measured on their own, :data:`UNIT_RATE_TERMS`) are taken from it and subtracted; the one
    term left is fitted (:func:`_fit_line`), none left: ``a`` is the mean of what remains."""
    known = {term: rate for term, rate in known.items() if term in xs[0]}
    free = [term for term in xs[0] if term not in known]
    if len(free) > 1:
        raise ValueError(f"terms {free}: at most one can be fitted; measure the others' rates")
    rest = [y - sum(rate * x[term] for term, rate in known.items()) for x, y in zip(xs, ys)]
    if not free:
        return {"a": float(np.mean(rest)), "rates": known}
    line = _fit_line([x[free[0]] for x in xs], rest)
    return {"a": line["a"], "rates": {free[0]: line["rate"], **known}}


def record_inputs(record: dict, settings: dict) -> tuple[Work, Derived, Options]:
    """A bench record's work as measured (counts, not Zipf) and the bench's options."""
    settings = {**BENCH_DEFAULTS, **settings}
    w = record["work"]
    work = Work(w["texts"], w["tokens"], w["chars"], w["eval_texts"])
    derived = Derived(w["kept_states"], w["dictionary_states"], w["token_ids"])
    options = Options(max_length=settings["max_length"], per_token=settings["cap"], cap=settings["cap"],
                      senses=settings["senses"], train_batch=16, train_steps=settings["train_steps"],
                      flush_every=settings["flush_every"])
    return work, derived, options


BENCH_SETTINGS = ("task", "threads", "max_length", "cap", "senses", "train_steps", "flush_every")
BENCH_DEFAULTS = {"flush_every": Options.flush_every}  # runs from before it was recorded had the default
# The terms whose CPU rate is measured on its own (bench_scale.py's unit rates), not fitted:
# stage 0 and the count are mostly start-up at bench sizes, and the combine's time has a term
# per token id and one per byte of states, which growing N alone cannot tell apart.
UNIT_RATE_TERMS = {"texts": "chars", "count": "tokens", "combine": "state_bytes"}


def fit_constants(records: list[dict], settings: dict, date: str, machine: str, unit_rates: dict) -> dict:
    """The CPU unit costs from bench_scale records (MiniLM): per stage and metric, ``a`` and the
    terms' rates; the CPU rates of :data:`UNIT_RATE_TERMS` from ``unit_rates`` (bench_scale's
    ``measure_unit_rates``: ``{stage: {"term", "rate", ...}}``), which must hold every one."""
    minilm = TEACHERS["minilm"]
    given = {stage: unit_rates.get(stage, {}).get("term") for stage in UNIT_RATE_TERMS}
    if given != UNIT_RATE_TERMS:
        raise ValueError(f"unit rates for {given}, the plan needs {UNIT_RATE_TERMS}")
    settings = {**BENCH_DEFAULTS, **settings}
    inputs = [record_inputs(record, settings) for record in records]
    work_terms = [drivers(work, derived, minilm, options) for work, derived, options in inputs]
    stated = [model_terms(minilm, options, work, derived) for work, derived, options in inputs]
    stages = {}
    for stage in STAGES:
        stages[stage] = {}
        for metric in METRICS:
            xs = [x[stage][metric] for x in work_terms]
            ys = [record["stages"][stage][metric] - model[stage][metric] for record, model in zip(records, stated)]
            known = {UNIT_RATE_TERMS[stage]: unit_rates[stage]["rate"]} if metric == "cpu_s" and stage in UNIT_RATE_TERMS else {}
            stages[stage][metric] = fit_terms(xs, ys, known)
    return {"date": date, "machine": machine, "fitted_on_texts": [r["work"]["texts"] for r in records],
            "settings": {key: settings[key] for key in BENCH_SETTINGS},
            "zipf_law": fit_zipf(records, minilm.vocab, settings["cap"], settings["senses"]),
            "unit_rates": unit_rates, "stages": stages}


def load_constants(path: Path = CONSTANTS_FILE) -> dict:
    """bench_scale's fitted constants; ValueError for a file of another layout (an older fit,
    with one rate per stage and a two-parameter law)."""
    constants = json.loads(Path(path).read_text())
    terms = drivers(Work(1, 1, 1, 1), Derived(1, 1, 1), TEACHERS["minilm"], Options())

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def fitted(row, stage: str, metric: str) -> bool:
        rates = row.get("rates") if isinstance(row, dict) else None
        return number(row.get("a")) and isinstance(rates, dict) and set(rates) <= set(terms[stage][metric]) \
            and all(map(number, rates.values()))

    try:
        valid = isinstance(constants["date"], str) and isinstance(constants["machine"], str) \
            and number(constants["settings"]["threads"]) and len(constants["zipf_law"]) == 3 \
            and all(map(number, constants["zipf_law"])) and set(constants["stages"]) == set(STAGES) \
            and all(fitted(constants["stages"][stage][m], stage, m) for stage in STAGES for m in METRICS)
    except (KeyError, TypeError):
        valid = False
    if not valid:
        raise ValueError("not the constants of this version's bench/bench_scale.py (refit them with it)")
    return constants


def cpu_costs(constants: dict, work: Work, derived: Derived, teacher: Teacher, options: Options) -> dict:
    """Each stage's wall s, peak host MB and disk MB at our CPU's rates."""
    x = drivers(work, derived, teacher, options)
    model = model_terms(teacher, options, work, derived)
    return {stage: {m: constants["stages"][stage][m]["a"] + model[stage][m]
                    + sum(rate * x[stage][m][term] for term, rate in constants["stages"][stage][m]["rates"].items())
                    for m in METRICS} for stage in STAGES}


def validate(constants: dict, record: dict) -> dict:
    """The plan for a bench record (its texts, tokens and characters; kept states from Zipf, as a
    plan has them) against what that record measured: per stage and metric, predicted, measured
    and the relative error."""
    work, _, options = record_inputs(record, constants["settings"])
    minilm = TEACHERS["minilm"]
    predicted = cpu_costs(constants, work, derive(work, minilm, options, tuple(constants["zipf_law"])), minilm, options)
    return {stage: {m: {"predicted": predicted[stage][m], "measured": record["stages"][stage][m],
                        "error": predicted[stage][m] / max(record["stages"][stage][m], 1e-9) - 1} for m in METRICS}
            for stage in STAGES}


# ------------------------------------------------------------------------------ the GPU side


def _mcl_seconds(n: np.ndarray, device: str) -> float:
    """MCL's count rule over tokens of n states each (H100_FIGURES: GPU, or numpy on 16 cores)."""
    n0, t0, n1, t1 = MCL_H100_S if device != "cpu" else (1_000, 1.79, 4_000, 40.1)
    power = math.log(t1 / t0) / math.log(n1 / n0)
    return float((t0 * (n[n >= 5] / n0) ** power).sum())


def device_memory_mb(stage: str, work: Work, derived: Derived, teacher: Teacher, options: Options) -> float:
    """The stage's GPU memory per process (the module docstring's formulas); 0: none."""
    H, D = teacher.hidden, derived.dictionary_states
    length = min(work.mean_tokens * 2, options.max_length)  # a batch pads to its longest text
    forward = teacher.params * 2 + options.gather_batch * length * H * 2 * 16
    student = teacher.student_params * 16 + D * H * 4 + options.train_batch * length * H * teacher.student_layers * 34
    memory = {"gather": forward, "targets": forward + D * H * 2, "teacher_embeddings": forward,
              "cluster": 3 * 4 * options.batch_elements, "train": student,
              "evaluate": teacher.student_params * 2 + options.gather_batch * length * H * 2 * 16}
    return memory.get(stage, 0.0) / MB


def plan(work: Work, teacher: Teacher, options: Options, constants: dict) -> dict[str, dict]:
    """Per stage: disk MB, peak host MB, device MB, seconds and where the time comes from."""
    derived = derive(work, teacher, options, tuple(constants["zipf_law"]))
    costs = cpu_costs(constants, work, derived, teacher, options)
    cpu_source = f"CPU rate ({constants['date']}, {constants['settings']['threads']} thread)"
    rows = {}
    for stage in STAGES:
        row = {"disk_mb": costs[stage]["disk_mb"], "host_mb": costs[stage]["peak_rss_mb"],
               "device_mb": 0.0, "seconds": costs[stage]["cpu_s"], "time_from": cpu_source}
        if options.device != "cpu":
            row["device_mb"] = device_memory_mb(stage, work, derived, teacher, options)
            forward_tokens_s = H100_FORWARD_TOKENS_S * H100_FORWARD_PARAMS / teacher.params
            student_tokens_s = H100_FORWARD_TOKENS_S * H100_FORWARD_PARAMS / teacher.student_params
            gpu_seconds = {
                "gather": work.tokens / forward_tokens_s / options.gather_gpus,
                "targets": work.tokens / forward_tokens_s / options.gather_gpus,
                "teacher_embeddings": work.tokens * options.teachers / forward_tokens_s / options.gather_gpus,
                "train": options.steps(work) * options.train_batch * work.mean_tokens / (student_tokens_s / 3),
                "evaluate": work.eval_texts * work.mean_tokens / student_tokens_s}
            if stage in gpu_seconds:
                row["seconds"], row["time_from"] = gpu_seconds[stage], GPU_SOURCE
            elif stage != "cluster":
                row["time_from"] += ", host work: no GPU figure"
        if stage == "cluster" and options.k_rule == "mcl":
            counts = np.minimum(law_counts(work.tokens, teacher.vocab, tuple(constants["zipf_law"])), options.per_token)
            row["seconds"] += _mcl_seconds(counts, options.device) / options.cluster_procs
            row["time_from"] = f"k-means: {cpu_source}; MCL: {GPU_SOURCE if options.device != 'cpu' else 'H100_FIGURES host (numpy, 16 cores)'}"
        elif stage == "cluster" and options.device != "cpu":
            row["time_from"] += ", k-means: no GPU figure"
        rows[stage] = row
    return rows


def _size(mb: float) -> str:
    return f"{mb / 1024:,.1f} GB" if mb >= 1024 else f"{mb:,.0f} MB"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def format_plan(rows: dict[str, dict], stages=STAGES) -> str:
    lines = ["| stage | disk | peak host memory | device memory | time | time from |", "|---|---|---|---|---|---|"]
    for stage in stages:
        row = rows[stage]
        device = _size(row["device_mb"]) if row["device_mb"] else "-"
        lines.append(f"| {stage} | {_size(row['disk_mb'])} | {_size(row['host_mb'])} | {device} | "
                     f"{_duration(row['seconds'])} | {row['time_from']} |")
    return "\n".join(lines)
