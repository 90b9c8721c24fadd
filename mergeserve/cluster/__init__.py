"""Distributed execution of merge plans on Ray."""
