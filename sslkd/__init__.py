"""sslkd: MKDT dataset distillation for self-supervised pre-training (Joshi, Ni, Mirzasoleiman, ICLR 2025)."""

from pathlib import Path

__version__ = "0.1.0"
PACKAGE_DIR = Path(__file__).resolve().parent  # the sslkd/ folder that runs (a launcher's code snapshot's, too)
