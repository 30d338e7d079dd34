"""The prepared GPU check (issue 19): one command that exercises what only an accelerator shows.

``python -m benchmarks.gpu`` runs, on one CUDA GPU and within a time budget (default 450 s):
bf16 training steps of every registered method with their loss agreement against fp32, QLoRA,
prefix sharing under SDPA, gradient checkpointing, the attention implementations, and
``benchmarks.bench`` against TRL for DPO at batch 8 × up to 1024 tokens. It writes
``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default ``$OUT``).

``--dry`` runs the same checks on CPU with a tiny random model, one step each, so that everything but
the CUDA steps is exercised here (tests/test_gpu_check.py). ``python -m benchmarks.gpu prepare``
gathers, on a machine with the registry, what the GPU machine lacks (benchmarks/gpu/README.md).
"""
