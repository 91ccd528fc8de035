"""Measurements of the runner itself, each a command (nothing here is imported by a run):

- :mod:`craft_runner.bench.speed`: ``make bench`` / ``craft-bench`` / ``python -m craft_runner.bench``, speed
  ratios measured side by side (SAM / Adam step, HVP / gradient, ONNX int8 / fp32, ...).
- :mod:`craft_runner.bench.smoke_paper`: ``make smoke-paper`` / ``craft-smoke-paper``, the papers' architectures
  at full size for a few steps per stage on the CPU, and the projected GPU hours of their tables.
- :mod:`craft_runner.bench.gpu_measure`: ``craft-gpu-measure`` (``scripts/gpu_session.sh``), the CUDA figures.
"""
