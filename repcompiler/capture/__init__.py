"""Capture: turning a model's Python into fx graphs the compiler can read."""
