"""Test, fault and benchmark harnesses: Hypothesis fuzzing of the caches and
file loaders (``fuzz``), the assistant killed, fuzzed over HTTP, starved of
memory and slow-client tested (``faults``, ``fuzz_http``, ``pressure``,
``reliability``), and the assistant's benchmarks (``bench_serve``,
``bench_resume``). They sit on top of everything else; test-only packages
(Hypothesis, openai) are imported when a harness runs, with a clear message
when the ``test`` extra is missing."""
