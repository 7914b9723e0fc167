"""lorafleet sidecar: syncs a pool pod's adapters from S3 into the shared cache."""
