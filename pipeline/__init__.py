"""A staged fine-tuning pipeline for Hugging Face classifiers, traceable in Weights & Biases.

Importing the package is cheap: torch, transformers and wandb are imported only inside the
stages and helpers that need them.
"""

__version__ = "0.1.0"
