"""mmalign.rollout: generation and experience for online methods.

- ``generate.py``: batched HF ``model.generate`` (KV cache, left padding, end-of-turn stop, seeded
  sampling) for VLMs and text LMs — ``from mmalign.rollout.generate import generate``.
"""
