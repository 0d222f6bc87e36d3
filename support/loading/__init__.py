"""The loading layer (docs/layout.md)."""
