"""Utilities every layer may use: errors, safe file IO, environment variables, progress, devices, hashing, run directories, sharding helpers, the version."""
