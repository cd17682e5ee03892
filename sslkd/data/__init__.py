"""Data: the datasets and their image sources, augmentations and the training data as the students see them.

Imports only the ground modules (sslkd.errors, sslkd.progress, ...): docs/architecture.md."""
