"""minigpt: train and run small GPT decoders, and measure what they cost.

Layers (imports point down only; tests/test_layering.py keeps it so):
  errors, config                      torch-free bottom
  model                               the GPT (torch)
  data, checkpoint, distributed       corpus/tokens, run directories, torchrun
  generate, train                     inference and training
  cli                                 the `minigpt` command
"""

__version__ = "0.2.0"
