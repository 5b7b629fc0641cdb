"""The batch stages: extraction into the feature store, training, scoring (docs/architecture.md)."""
