"""mmalign.recipes: one training loop per method, each readable top to bottom.

``run.py`` holds what every recipe shares (run directory, metrics log, pickle-free checkpoints with
resume, AdamW + warmup-cosine, progress bar); ``sft.py`` is supervised fine-tuning. Shipped YAML
configs live in ``recipes/configs/`` and load with :func:`mmalign.config.load_config`.
"""
