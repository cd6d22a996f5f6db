"""Optional adapters that let other tools run divla-eval's tasks (each needs its own extra)."""
