"""Trainable tokens on their own (``TRAINABLE_TOKENS``): the listed rows of an embedding replaced by
the trained ones, as peft's ``TrainableTokensLayer.merge`` does (index_copy). The same update as
LoRA's ``trainable_token_indices``; a tied lm_head is the same parameter and changes with it.
"""
from __future__ import annotations

from stages.findings import FuseError
from stages.peft import lora

PEFT_TYPE = "TRAINABLE_TOKENS"
SUFFIXES = {".trainable_tokens_delta": ("weight", "tokens")}


def check_config(config: dict, path) -> None:
    if not config.get("token_indices"):
        raise FuseError("F201", "a trainable-tokens adapter needs token_indices", file=str(path), key="token_indices")


def make_update(index, adapter, module, param, roles, target, ctx=None):
    update = lora.trainable_tokens_update(index, adapter, module, roles["tokens"], target, ctx)
    update.peft_type = PEFT_TYPE
    return update


def apply(W, W0, update, t, adapter=None):
    return lora.apply(W, W0, update, t, adapter)
