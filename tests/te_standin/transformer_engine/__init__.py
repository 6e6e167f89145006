"""A pure-PyTorch stand-in for transformer-engine, for tests on machines without CUDA.

It is NOT transformer-engine: it reproduces the parts of its PyTorch API that
mimo-spec's ``backend: te`` uses (constructor arguments, parameter names and
registration order, ``_extra_state`` in state dicts, activation semantics:
TE's ``gelu`` is the tanh approximation, gated activations act on the first
half of fc1's output), as read from TransformerEngine 2.x's sources, so the
wiring and the checkpoint key mapping are tested here. ``tests/test_te_backend.py``
also has a test against the real library that runs only where CUDA and
transformer-engine are present.
"""
