"""Sampling: the teacher's multi-step samplers (teacher.py, configured by spec.py, which stays torch-free for
the config checks), the student's 1-4 step sampler (student.py) and its shifted LCM scheduler (scheduler.py)."""
