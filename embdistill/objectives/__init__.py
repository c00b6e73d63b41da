"""Training objectives: one file each, found by the stage's ``--loss``.

An objective declares what it needs (a sense dictionary, stored targets, the teacher's states,
the teachers' shards), what it adds to the run's identity, its collator, metrics and export
extras, and calls the model and its formula (:mod:`embdistill.losses`). Stage 5's contract is
:class:`~.base.StudentObjective`; stage 11's, :class:`~.teacher_heads.MultiTeacherObjective`.

Two registries, one per stage: the stages' objectives cannot stand in for each other (stage 5's
score the token states of a student copied from the teacher; stage 11's, heads over a pooled
student against stored teacher embeddings), and ``mse`` names a different objective in each.
A new loss: a file here, one line in its stage's registry (README, "Adding a loss").
"""

from .base import StudentObjective, StudentRun, objective_named
from .kernel_nll import KernelNLL
from .pooled_matching import PooledMatching
from .sense import SenseDistillation
from .sense_pooled import SensePooled
from .state_matching import StateMatching
from .teacher_heads import MultiTeacherObjective
from .teacher_mse import TeacherMSE

# scripts/05_train.py --loss
STUDENT_OBJECTIVES: dict[str, type[StudentObjective]] = {
    "sense": SenseDistillation,
    "mse": StateMatching,
    "pooled-mse": PooledMatching,
    "sense-pooled": SensePooled,
}

# scripts/05_train.py's default: the best exported student on the mean over four task families
# without losing classification, in bench/study_skd.py (bbc-news and a user file of short texts,
# 3 seeds; BENCHMARKS.md). The paper's objective stays one option away: --loss sense.
DEFAULT_OBJECTIVE = "pooled-mse"

# scripts/11_train_multiteacher.py --loss
MULTITEACHER_OBJECTIVES: dict[str, type[MultiTeacherObjective]] = {
    "nll": KernelNLL,
    "mse": TeacherMSE,
}

__all__ = ["DEFAULT_OBJECTIVE", "MULTITEACHER_OBJECTIVES", "STUDENT_OBJECTIVES", "KernelNLL", "MultiTeacherObjective", "PooledMatching",
           "SenseDistillation", "SensePooled", "StateMatching", "StudentObjective", "StudentRun", "TeacherMSE", "objective_named"]
