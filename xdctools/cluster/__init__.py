"""Clustering stored features: out-of-core k-means (kmeans), its streaming assign object (assign), reports."""

from xdctools.cluster.kmeans import (
    ClusterResult,
    KMeansParams,
    cluster_array,
    cluster_store,
    load_result,
    save_result,
)

__all__ = ["ClusterResult", "KMeansParams", "cluster_array", "cluster_store", "load_result", "save_result"]
