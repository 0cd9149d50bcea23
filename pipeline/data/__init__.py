"""The data layer, one job per module; this package imports nothing itself, so `import pipeline.data.shards`
stays light (no torch, no Lightning).

    shards      the shard format: WebDataset tars + manifest.json, written atomically; sample codec; the one
                tar header parser (tar_members) and the one remote-URL test (is_remote)
    recipes     named sources (digits, dsprites, mnist, npz, images) -> uint8 images, labels, factors
    prepare     recipe -> split -> shards (`python -m pipeline.prepare`); ensure_prepared, PrepareError
    sources     a split's shards and sample counts from a manifest, directory, pattern or URL;
                SplitSource, resolve_source, DataSetupError; open_shard, HashingStream
    layout      pure assignment of samples to rank x worker lane x batch for an epoch and a start batch
    reader      tar bytes -> raw samples for one worker, with the data.on_error policy; Reader
    decode      raw sample -> image, label, factors (ImageSpec); a block of bytes -> Columns (the fast path)
    index       `prepare index`: manifests for shards written by other tools
    autoindex   local shards without a manifest indexed at start (as `prepare index`), cached per shard list
    stream      ShardStream(source, StreamSpec): the IterableDataset of the stages plan -> read -> decode ->
                fill -> collate
    loader      ShardLoader (DataLoader with state_dict / load_state_dict), worker_init
    datamodule  ShardDataModule, the LightningDataModule over a DataConfig
"""
