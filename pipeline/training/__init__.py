"""Training with Lightning: the LightningModule (module), callbacks, the few places that bend Lightning
(lightning_compat, hooks), device defaults (accel), the start-up summary (console) and the entry point
(train: `python -m pipeline.train`)."""
