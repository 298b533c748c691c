"""The pure planner: resolved inputs in, a frozen :class:`Plan` out."""

from cocoonplan.planner.compile import PlanInput, make_plan
from cocoonplan.planner.model import FORMAT_VERSION, Action, Plan, VMPlan

__all__ = ["FORMAT_VERSION", "Action", "Plan", "PlanInput", "VMPlan", "make_plan"]
