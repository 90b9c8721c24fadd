"""Merge sweeps: many variants of one recipe, merged with shared reads, evaluated and ranked."""
