"""The layers under the stage scripts, one folder each (docs/layout.md): nobody runs these files, the scripts at
the top level import them. Lowest first; a module imports only from its own layer and those below
(tests/test_layers.py):

- cli.py (here): the argument parser every script uses; imports nothing of ours
- model/: k_model.py's fast paths and conversions (k_model.py is at the top level)
- data/: tokenizer constants and task files (dataset.py is at the top level)
- loading/: checkpoints, LoRA, open_model (any model source -> model + tokenizer + origin)
- inference/: TextGenerator, serve.py's generation engine, lm-eval on our model
- training/: the trainer's parts (trainer.py is at the top level)
"""
