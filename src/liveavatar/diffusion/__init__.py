"""Diffusion: the flow-matching schedule shared by training and the engines."""
from .flow import FlowSchedule

__all__ = ["FlowSchedule"]
