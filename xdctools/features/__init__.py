"""Features on disk: the Zarr feature store written by extraction and read by clustering."""

from xdctools.features.store import FeatureStore, RowWriter, create_store, open_store, write_rows

__all__ = ["FeatureStore", "RowWriter", "create_store", "open_store", "write_rows"]
