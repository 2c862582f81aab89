"""The command-line tools (console scripts ``mlx_kvq.<tool>``): generate, eval,
bench, bench_ranks, plan, and what they share (schemes, plots, corpus,
argument types). Built on the runtime library; nothing in the library imports
them."""
