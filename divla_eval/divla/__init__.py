"""DiVLA (Diffusion-VLA): reasoning by next-token prediction plus a diffusion action head.

`model.py` is the network, `policy.py` the Policy-protocol wrapper and checkpoint format, `train.py`
its recipe for `divla-eval train`, `tokenizer.py` the offline vocabulary, `config.py` the sizes.
Importing this package does not import torch; its modules do.
"""
