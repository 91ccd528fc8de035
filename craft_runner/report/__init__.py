"""Results → pandas → the papers' tables."""
