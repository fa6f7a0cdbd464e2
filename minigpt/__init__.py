"""minigpt: train and run small GPT decoders, and measure what they cost.

Bands, bottom to top (imports point down or stay in their band; tests/test_layering.py keeps it so):
  core/ analytic/                       torch-free: config, plan, errors, formats, hardware; formulas, extrapolation
  nn/ data/                             the model and its ops; corpus -> tokens -> batches
  parallel/                             torchrun, parallelize (TP -> AC -> compile -> FSDP), backends
  train/ infer/ measure/ interop/       the loop and runs; generation and serving; counting; Hugging Face
  apps/                                 quickstart, speculative comparison, decode benchmark
  cli.py                                the `minigpt` command
"""

__version__ = "0.3.0"
