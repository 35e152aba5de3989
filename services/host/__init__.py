"""Running the modelgrid processes of one host from a small description (`modelgrid-host`)."""
