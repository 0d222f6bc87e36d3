"""The data layer (docs/layout.md)."""
