"""The output prefix: its layout and storage, manifest rows and parts, codecs, posters, verify, report."""
