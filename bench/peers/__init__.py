"""The peers dist_train is measured against, as their users write them: each script runs under
`torchrun` and reads one JSON spec (model config, DeepSpeed config, shards, batch, steps)."""
