"""Training: the loop (loop.py), one optimiser step (step.py) shared with `bench`, the checkpointed state
(state.py), optimisers and EMA (optim.py), and the student's construction (build.py)."""

from ..models.student import LORA_DIR
from .build import build_student, check_student, read_student_init
from .loop import distill, ensure_writable, save_student

__all__ = ["LORA_DIR", "build_student", "check_student", "distill", "ensure_writable", "read_student_init",
           "save_student"]
