"""The text tokenizer of a from-scratch DiVLA backbone, trained offline on the demonstrations' words.

No model hub is reachable, so a small backbone cannot borrow Qwen2's 151k-token vocabulary; it gets a
byte-level BPE vocabulary learnt (with the `tokenizers` library) from the training instructions and
reasoning phrases. Byte-level means any text still encodes, held-out instructions and unseen object
names included: unknown words fall apart into sub-words or bytes instead of an <unk>. The result is a
`PreTrainedTokenizerFast`, saved beside the weights and reloaded offline with `from_pretrained`.

A checkpoint built on a real Qwen2 / Qwen2-VL directory uses that directory's own tokenizer instead.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learnt from `texts` (deterministic for the same texts)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
