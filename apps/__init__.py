"""Applications built on mlx_kvq, shipped as mlx_kvq.apps."""
