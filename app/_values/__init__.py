"""_values."""
