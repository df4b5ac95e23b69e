"""Publish targets: one module per target, one shared algorithm (:func:`base.sync`).

A target implements :class:`base.Publisher` (authenticate, open, check_release, remote,
previous, push, verify, seal); :func:`base.sync` runs those steps in the same order for
every target, so idempotence (compare sha256 first), resume (send only what the target
lacks), deletion of files an earlier publish left, and verification behave alike.

Nothing heavy is imported here: each target imports its client (huggingface_hub, boto3)
inside its own functions.
"""
from __future__ import annotations

import importlib

TARGETS = ("dir", "hub", "s3")


def publisher_class(to: str):
    """The :class:`~stages.publishers.base.Publisher` subclass of a target name."""
    if to not in TARGETS:
        raise KeyError(to)
    return importlib.import_module(f"stages.publishers.{to}").Publisher
