"""lorafleet gateway: one HTTP front for a pool's replicas that routes by adapter affinity with load
awareness and admits only each tenant's own API keys to its own adapters, within its limits."""
