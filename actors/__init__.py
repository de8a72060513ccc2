"""Ray actors: thin glue that moves data between `farm/` functions on the cluster."""
