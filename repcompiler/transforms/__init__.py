"""The transforms behind the public entry points: fold, deploy, orepa_transform, linearize."""
