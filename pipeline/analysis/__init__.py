"""Analysis of trained runs: evaluation (ELBO, IWAE, MIG), disentanglement metrics, run-comparison reports,
the science check (a small beta sweep) and the throughput benchmark. `python -m pipeline.evaluate`,
`pipeline.report`, `pipeline.bench` and `pipeline.science` run the `main` of these modules."""
