"""The model layer (docs/layout.md)."""
