"""The driver's front end (no Ray): datasets, rows, validation, resume and preflight, streamed in windows."""
