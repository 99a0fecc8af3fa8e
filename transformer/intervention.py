"""Teacher Intervention schedules (Kim et al., EACL 2023; docs/algorithms.md §6): which mode step `step` of step 1 runs.

The replacement itself happens in the student's forward (`transformer.model.Intervention`); this module
only decides, per optimizer step, which teacher tensor is handed over:

| schedule (--ti.mode) | modes over step 1 (N1 steps, 0-based step index)          |
|----------------------|-----------------------------------------------------------|
| gradual (TI-G)       | output (OI) < N1/6, context (CI) < N1/3, map (MI) after    |
| inverted             | map < N1/3, context < 2·N1/3, output after                 |
| stochastic           | one of output, context, map, drawn uniformly every step    |
| map, context, output | that mode at every step                                    |
"""
from __future__ import annotations

import numpy as np

from transformer.config import TI_SCHEDULES
from transformer.model import TI_TENSOR

SINGLE_MODES = tuple(TI_TENSOR)  # ("map", "context", "output")
# Numeric codes for TensorBoard (a scalar per step); the JSONL log also holds the name.
MODE_CODE = {None: 0, "map": 1, "context": 2, "output": 3}


def mode_at(schedule: str, step: int, n1: int, seed: int = 0) -> str:
    """The intervention mode of 0-based step `step` of a step 1 lasting `n1` steps.

    The stochastic draw depends only on (seed, step), so a resumed run and every DDP rank draw the same mode.
    """
    if not 0 <= step < n1:
        raise ValueError(f"step {step} is outside step 1 (0 <= step < {n1})")
    if schedule in SINGLE_MODES:
        return schedule
    if schedule == "gradual":
        return "output" if step < n1 / 6 else "context" if step < n1 / 3 else "map"
    if schedule == "inverted":
        return "map" if step < n1 / 3 else "context" if step < 2 * n1 / 3 else "output"
    if schedule == "stochastic":
        return ("output", "context", "map")[int(np.random.default_rng([seed, step]).integers(3))]
    raise ValueError(f"unknown Teacher Intervention schedule {schedule!r}; choose from {', '.join(TI_SCHEDULES)}")
