"""Training loops and steps: one module per model family, read top to bottom."""
