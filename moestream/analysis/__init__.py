"""Offline analysis of recorded runs: replaying routing traces through the cache policies, next to
Belady's MIN and lookahead oracles (the bounds every online policy is measured against)."""
