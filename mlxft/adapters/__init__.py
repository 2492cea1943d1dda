"""Adapter logic that is the same for every backend: which modules, initial weights, file layout."""

from mlxft.adapters.files import load_adapter, save_adapter
from mlxft.adapters.targets import AdapterPlan, LinearInfo, plan_adapters

__all__ = ["AdapterPlan", "LinearInfo", "plan_adapters", "save_adapter", "load_adapter"]
