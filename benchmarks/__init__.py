"""Side-by-side timing of vlmtune against the plain Hugging Face stack, Liger-Kernel and Unsloth (a GPU's work).

Run from the repository root as modules, e.g. ``python -m benchmarks.train_step --model qwen2_5_vl-7b --shape
fixed``; BENCHMARKS.md lists every command and the results.
"""
