"""Rewrite: replacing owner modules' code with folded forms, and verifying the result."""
