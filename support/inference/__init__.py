"""The inference layer (docs/layout.md)."""
