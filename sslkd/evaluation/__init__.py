"""Evaluation: pre-training and probing an encoder on a set, fine-tuning, transfer, and the statistics, tables
and plots of the results.

Imports the ground, sslkd.data and sslkd.methods: docs/architecture.md."""
