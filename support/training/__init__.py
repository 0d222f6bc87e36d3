"""The training layer (docs/layout.md)."""
