"""mmalign: align vision-language and text models with fine-grained human/AI feedback.

Layers (a module imports only from layers below it):
cli → recipes → eval → rollout → losses → models → world → data. See docs/ and DESIGN.md.
"""

__version__ = "0.1.0"
