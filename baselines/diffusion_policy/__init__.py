"""Diffusion Policy (Chi et al., RSS 2023), the CNN-based variant, as a baseline for DiVLA.

config.py (the typed config, saved as config.json), policy.py (the network and its Policy adapter),
train.py (its recipe for `divla-eval train`). Importing the package imports nothing heavy.
"""
