"""RuntimeService for NVIDIA GPUs: artifacts on bitsmith's kernels (Triton W4A16/W8A16, FP8 tensor cores)."""
