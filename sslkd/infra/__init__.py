"""Infrastructure: how stages are launched, tracked, placed on a device and given memory (not what they compute)."""
