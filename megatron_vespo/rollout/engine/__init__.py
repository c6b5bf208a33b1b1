"""The parts of the local engine, one concept each; ``rollout/local_engine.py`` assembles them into
``LocalEngine`` (construction, the request queue, pause/abort control, info).

* ``requests``: what a request is (``Sampling``, ``Request``) and ``prepare``, its validation;
* ``scheduler``: the scheduler thread, continuous batching, the model forward, finishing requests;
* ``running_batch``: the running batch's tensors (rows, shared KV cache, mask, positions);
* ``sampler``: the next token and its log-prob as SGLang's sampler, and the finish checks;
* ``answers``: the ``/generate`` answer of a finished request;
* ``weights``: weight updates (tensors, disk, distributed) and SGLang's weight-update session.
"""
