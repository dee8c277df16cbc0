"""`xdctools shard`: videos -> WebDataset tar shards that DALI reads (see docs/shard-format.md)."""
