"""kandinsky-batch: render Parquet prompt datasets to videos with Kandinsky 5 on Ray."""

__version__ = "0.1.0"
