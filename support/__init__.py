"""The support layers under the stage scripts: nobody runs these files, the scripts at the top level import them.

By layer, lowest first (a module imports only from its own layer and the ones below):
- model: cpu_matmul, compiled_step, chunked_loss, sampling, rope (RoPE frequencies and scaling), context_shift (used
  by k_model.py), hf_llama (k_model <-> transformers)
- data: tokenizer_spec (special tokens, chat template, fingerprint), task_data (arithmetic, GSM8K and evaluation task
  files, built by data_process.py; dataset.py is at the top level)
- loading: checkpoint (ckpt.pt and DCP checkpoints), lora, loading (open_model: any model source -> model + tokenizer
  + origin)
- training: train_task, train_steps, train_progress, train_flags, trainer_utils (DDP), fsdp (FSDP2 + DCP), optim, perf
  (trainer.py is at the top)
- inference: generation_engine (serve.py's continuous batching)
"""
