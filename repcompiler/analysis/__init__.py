"""Analysis: what the user's code does (uses, effects, regions, pairing, policy), read without changing it."""
