"""RuntimeService for Apple silicon: MLX artifacts through mlx (its CPU backend off-Mac)."""
