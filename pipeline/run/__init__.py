"""A run directory and what lives in it: the lock and identity (rundir), atomic files (files),
checkpoints and their verified loading (checkpointing), the W&B run id and the metrics CSV (tracking),
and syncing offline W&B runs from a login node (sync)."""
