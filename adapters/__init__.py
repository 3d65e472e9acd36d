"""I/O boundaries: stores, queues, LLM providers, rate limiters. One module per backend.

Each adapter implements a port of :mod:`pipeline.ports` and speaks the domain's
records (:mod:`pipeline.model`); adapters know no handlers.
"""
