"""Deciding ahead of time: expert prefetch prediction, CPU-vs-GPU cost model, placement planning.

Empty in the foundation: the offload engine fills it.
"""
