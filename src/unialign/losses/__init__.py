"""Loss functions: one small pure function per method, looked up through the registry.

The registry is a leaf that the family modules import; importing this package imports every family,
so every method is registered before anyone can ask the registry for one.
"""

from unialign.losses import families, grpo, ppo, una_online  # noqa: F401  (registers every method)
from unialign.losses.base import LossOutput, MethodInputs
from unialign.losses.registry import Method, all_methods, check_format, get_method

__all__ = ["LossOutput", "Method", "MethodInputs", "all_methods", "check_format", "get_method"]
