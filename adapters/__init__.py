"""I/O boundaries: stores, queues, LLM providers, rate limiters. One module per backend.

Adapters know no pipeline: they speak in jobs, artifacts, events and LLM calls
as defined in :mod:`adapters.ports`.
"""
