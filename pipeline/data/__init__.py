"""The data layer, one job per module (imports nothing itself, so `import pipeline.data.shards` stays light)."""
