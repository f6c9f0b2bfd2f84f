"""Pure planning (no torch): packing jobs' samples into microbatches and ordering them.

    from scheduler import Job, plan, verify
    p = plan(jobs, capacity_tokens=4096, pipeline_depth=4, pad_multiple=128, time_limit_s=1.0)
    verify(p, jobs, capacity_tokens=4096, pipeline_depth=4, pad_multiple=128)

    planner = WindowPlanner(capacity_tokens=4096, pipeline_depth=4, pad_multiple=128, time_limit_s=0.2)
    window = planner.next_window([Job("a", [[512, 300]], first_global_batch=7), ...])
    size = window_global_batches(round_tokens, capacity_tokens=4096, slots=4)  # global batches per window

    sim = simulate_plan(p.microbatches, jobs, CostModel(), stages=4)   # makespan, bubble fraction
"""

from scheduler.cost import CostModel, fit_cost_model
from scheduler.greedy import first_fit_decreasing
from scheduler.planner import WindowPlanner, plan, window_global_batches
from scheduler.problem import Job, Microbatch, Plan, PlanStats
from scheduler.simulate import Simulation, microbatch_lengths, simulate_1f1b, simulate_plan, token_imbalance
from scheduler.verify import verify, verify_windows

__all__ = [
    "Job", "Microbatch", "Plan", "PlanStats", "plan", "verify", "verify_windows", "WindowPlanner", "window_global_batches",
    "first_fit_decreasing", "CostModel", "fit_cost_model", "Simulation", "simulate_1f1b", "simulate_plan",
    "microbatch_lengths", "token_imbalance",
]
