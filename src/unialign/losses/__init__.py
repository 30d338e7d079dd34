"""Loss functions: one small pure function per method, looked up through the registry."""

from unialign.losses.base import LossOutput, MethodInputs
from unialign.losses.registry import Method, all_methods, check_format, get_method

__all__ = ["LossOutput", "Method", "MethodInputs", "all_methods", "check_format", "get_method"]
