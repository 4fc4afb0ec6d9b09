"""The MiniLM multi-task merging demo: real text tasks from PyPI data packages, one fine-tuned expert per task,
merged with fastmerge and scored with frozen class-prompt heads (see examples/demo.py)."""
