"""What a multi-teacher run looks like while it trains: a probe batch and the validation loss.

:class:`TrainingMonitor` is the Trainer's ``on_step_end`` (rank 0). At every logging step it
measures, on a fixed probe batch (the first ``PROBE_TEXTS`` validation texts, else training
texts), with the model in eval mode:

* ``r2/<teacher>``: 1 - sum (t - mu)^2 / sum (t - mean(t))^2 over the probe batch's vectors
  and dimensions, the heads' mu against the teacher's vectors, both in the teacher's own space
  (so that runs with and without standardisation compare): whether the heads fit;
* ``cosine``: the mean pairwise cosine similarity of the student's embeddings: near 1 they
  all point one way (the collapse the issue measured: 0.62 -> 0.99), and a warning says so
  when it passes ``COSINE_WARNING``;

and, through :class:`embdistill.validation.ValidationHook` (at step 0, every ``val_every``
steps and at the last step), the validation scores on the held-out split (``val/similarity``,
``val/cka``, ``val/loss``, ``val/nll/<teacher>``, ...), which is never trained on, and the kept
checkpoint. All of it goes into metrics.jsonl beside the training loss (and its log-lambda and
squared-error parts), and into loss.png.
"""

from __future__ import annotations

import logging
import torch
import torch.nn.functional as F

from ..validation import ValidationHook
from .model import MultiTeacherStudent

log = logging.getLogger("embdistill.multiteacher.monitor")

PROBE_TEXTS = 64
COSINE_WARNING = 0.95


@torch.no_grad()
def probe_metrics(model: MultiTeacherStudent, batch: dict) -> dict[str, float]:
    """``r2/<teacher>`` and ``cosine`` (module docstring) of one collated batch (eval mode)."""
    was_training = model.training
    model.eval()
    embedding = model.embed(batch["input_ids"], batch["attention_mask"]).float()
    predictions = model.unscale_predictions({name: mu.float() for name, (mu, _) in model.predict(embedding).items()})
    metrics = {}
    for name, target in batch["targets"].items():
        residual = (target - predictions[name]).pow(2).sum()
        spread = (target - target.mean(0)).pow(2).sum()
        metrics[f"r2/{name}"] = float(1 - residual / spread.clamp_min(1e-12))
    metrics["cosine"] = mean_pairwise_cosine(embedding)
    model.train(was_training)
    return metrics


def mean_pairwise_cosine(embedding: torch.Tensor) -> float:
    """The mean cosine similarity over the pairs of distinct rows of (n, d), n >= 2."""
    unit = F.normalize(embedding.float(), dim=-1)
    n = len(unit)
    gram = unit @ unit.T
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


class TrainingMonitor:
    """The Trainer's ``on_step_end``: probe metrics every ``log_every`` steps and at the last
    step, and the ``validation`` hook's scores when it has any."""

    def __init__(self, probe_batch: dict, log_every: int, validation: ValidationHook | None = None):
        if len(probe_batch["input_ids"]) < 2:
            raise ValueError("the probe batch needs at least 2 texts (a pairwise cosine)")
        self.probe_batch = probe_batch
        self.log_every = log_every
        self.validation = validation
        self.collapsing = False

    def __call__(self, model: MultiTeacherStudent, step: int, finished: bool) -> dict[str, float]:
        metrics = {}
        if finished or step % self.log_every == 0:
            metrics.update(probe_metrics(model, self.probe_batch))
            self._warn_on_collapse(step, metrics["cosine"])
        if self.validation is not None:
            metrics.update(self.validation(model, step, finished))
        return metrics

    def _warn_on_collapse(self, step: int, cosine: float) -> None:
        collapsing = cosine > COSINE_WARNING
        if collapsing and not self.collapsing:
            log.warning("step %d: the student's embeddings are collapsing towards one direction (mean "
                        "pairwise cosine %.3f > %.2f on the probe batch); check the r2/* and log_lambda/* "
                        "metrics: heads that do not fit, or targets far below the kernel's scale "
                        "(--no-standardize), do this", step, cosine, COSINE_WARNING)
        self.collapsing = collapsing
