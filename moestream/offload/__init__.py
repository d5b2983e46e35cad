"""Expert offloading, in one place: where routed experts live (store: host RAM, disk), the device
expert cache and its eviction policies, the copies that move them (transfer), the guesses that move
them early (prefetch), the cost model that runs a miss on the CPU instead, the engine that answers
the model's experts seam, and the builder that assembles them from a plan."""
