"""Deciding what runs where and when: the placement plan (from budgets and shapes alone) and the
generation loop over sequences (prefill, decode one step, decode n steps)."""
