"""unialign: every alignment method as one implicit-vs-explicit reward loss, on one trainer."""

from unialign.config import UnialignConfig, load_config
from unialign.models import load_model, load_tokenizer
from unialign.pipeline import train
from unialign.run import TrainResult

__version__ = "0.1.0"

__all__ = ["TrainResult", "UnialignConfig", "load_config", "load_model", "load_tokenizer", "train", "__version__"]
