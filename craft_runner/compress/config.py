"""The compress schemas, re-exported from the modules that own them (kept for older imports)."""

from craft_runner.compress.prune import PruneConfig
from craft_runner.compress.qat import QATConfig
from craft_runner.compress.quant import PTQConfig
from craft_runner.compress.registry import CompressConfig

__all__ = ["CompressConfig", "PTQConfig", "PruneConfig", "QATConfig"]
