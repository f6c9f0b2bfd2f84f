"""Pure planning (no torch): packing jobs' samples into microbatches and ordering them.

    from scheduler import Job, plan, verify
    p = plan(jobs, capacity_tokens=4096, pipeline_depth=4, pad_multiple=128, time_limit_s=1.0)
    verify(p, jobs, capacity_tokens=4096, pipeline_depth=4, pad_multiple=128)
"""

from scheduler.greedy import first_fit_decreasing
from scheduler.planner import plan
from scheduler.problem import Job, Microbatch, Plan, PlanStats
from scheduler.verify import verify

__all__ = ["Job", "Microbatch", "Plan", "PlanStats", "plan", "verify", "first_fit_decreasing"]
