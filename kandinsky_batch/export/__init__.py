"""`export`: a finished job's ok rows, filtered by their scores, in the formats training loaders read."""
