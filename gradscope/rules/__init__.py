"""Rules: the registry of codes (no torch) and the checks that produce findings."""
