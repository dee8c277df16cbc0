"""xdctools: shard, load, cluster and train audio-video encoders by Cross-Modal Deep Clustering."""

__version__ = "0.1.0"
