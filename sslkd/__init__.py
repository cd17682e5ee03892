"""sslkd: MKDT dataset distillation for self-supervised pre-training (Joshi, Ni, Mirzasoleiman, ICLR 2025)."""

__version__ = "0.1.0"
