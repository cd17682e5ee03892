"""Thin stage entry points: parse config, load inputs, call library functions, write artifacts."""
