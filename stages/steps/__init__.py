"""The pipeline stages, one small module each (stage name == module name).

Each module declares ``NAME``, ``VERSION``, ``INPUT``, ``OUTPUT``, ``PARAMS`` and ``run(ctx)``
(see docs/internals.md). They live in their own package so that ``stages.merge`` stays the
one-shot merge function of the Python API, not the merge stage's module.
"""
