"""Where routed experts live (host RAM, disk) and how they reach the compute device."""
